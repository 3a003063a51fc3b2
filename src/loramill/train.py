"""Stage 4: train a LoRA adapter (peft) on a dataset's resized images and merged captions.

One readable loop in the style of diffusers' train_text_to_image_lora example, changed where
real datasets need it:

- memory is bounded by the batch: latents (and, with a frozen text encoder, text embeddings)
  are encoded once into a content-keyed disk cache (loramill.latents) and read per batch;
- mixed precision through accelerate: frozen weights in half precision, LoRA parameters and
  optimizer state in float32;
- exact resume: every checkpoint step saves the full state outside Snakemake's outputs
  (loramill.train_state); a rerun continues from it bit for bit, and so does a longer run.

Every random draw comes from seeded generators, so the same inputs and config give a
bit-identical adapter on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from loramill import LoramillError
from loramill import train_objective as objective
from loramill.buckets import batches, batches_per_epoch
from loramill.devices import resolve_device
from loramill.distributed import in_worker, launch, share
from loramill.files import write_bytes
from loramill.hashing import DEFAULT_DB, HashCache
from loramill.init_from import read_init_weights
from loramill.latents import CACHE_ROOT, encode_prompts, load_batch, read_pixels
from loramill.lora import load_network_state, network_state, write_checkpoint
from loramill.merge import tag_frequency
from loramill.model import base_model_hash, base_version, load_pipeline, model_folder, use_sdpa
from loramill.network import add_lora
from loramill.optimizers import make_optimizer, make_scheduler
from loramill.single_file import source_checkpoint
from loramill.stopping import Interrupted, StopRequest
from loramill.train_captions import CaptionVariation
from loramill.train_config import TrainConfig, checkpoint_steps
from loramill.train_data import Encoded, Examples, library_versions, read_examples
from loramill.train_log import Progress, plot_loss
from loramill.train_samples import SampleRenderer, sample_prompts, save_samples
from loramill.train_state import RunState

log = logging.getLogger(__name__)
HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def provenance(
    trigger: str,
    base_model: str,
    cfg: TrainConfig,
    examples: Examples,
    data_fingerprint: str,
    device: str,
    hashes: HashCache,
) -> dict[str, Any]:
    init_from = {"init_from_hash": hashes.file(cfg.init_from)} if cfg.init_from else {}
    # a base converted from a single-file checkpoint: that file's AUTOMATIC1111 hashes
    source = source_checkpoint(model_folder(base_model))
    single_file = {"base_model_file": source} if source else {}
    # No dataset name: training must not depend on it, so a renamed dataset keeps its adapter
    # (the export names it).
    return (
        {
            "trigger": trigger,
            "data_fingerprint": data_fingerprint,
            "base_model": base_model,
            "base_model_hash": base_model_hash(base_model, hashes),
            "train_config": cfg.as_dict(),
            "seed": cfg.seed,
            "resolution": examples.resolution,
            "buckets": dict(Counter(f"{w}x{h}" for w, h in sorted(examples.buckets))),
            "num_images": len(examples.captions),
            # what an epoch is (the export's ss_epoch): batches over every image × repeats
            "batches_per_epoch": batches_per_epoch(
                examples.buckets, cfg.global_batch_size, examples.times(cfg.repeats)
            ),
            "tag_frequency": tag_frequency(examples.captions),
            "device": device,
            "versions": library_versions(),
        }
        | init_from
        | single_file
    )


def check_gpus(processes: int, device_spec: str) -> None:
    """On CUDA every process needs a GPU of its own."""
    if resolve_device(device_spec).type == "cuda" and torch.cuda.device_count() < processes:
        raise LoramillError(
            f"train.num_processes: {processes} processes, and this machine has "
            f"{torch.cuda.device_count()} GPU(s)"
        )


def make_accelerator(cfg: TrainConfig, device_spec: str, logdir: str | os.PathLike) -> Any:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    device = resolve_device(device_spec)
    cfg.check_device(device.type)
    # accelerate keeps its settings in a process-wide singleton; a second training in one
    # process (tests, notebooks) with other settings must start from a clean one.
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=device.type == "cpu",
        log_with="tensorboard",
        project_dir=str(logdir),
    )


class Training:
    """The models, optimizer and data order of one run, and the step that advances them."""

    def __init__(
        self,
        cfg: TrainConfig,
        accelerator: Any,
        pipe: Any,
        encoded: Encoded,
        examples: Examples,
        samples: SampleRenderer | None = None,
    ) -> None:
        from diffusers import DDPMScheduler

        self.cfg, self.accelerator = cfg, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.encoded, self.captions, self.buckets = encoded, examples.captions, examples.buckets
        self.images, self.times = examples.images, examples.times(cfg.repeats)
        self.device = accelerator.device
        self.vae = None if cfg.cache_latents else pipe.vae.to(self.device).eval()
        self.samples = samples
        self.rng = torch.Generator().manual_seed(cfg.seed)  # every draw of the loop
        self.order: list[list[int]] = []  # the epoch's batches still to train on
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.tokenizer = pipe.tokenizer
        self.variation = CaptionVariation(cfg)
        # Captions that vary per step are encoded per step, by the frozen encoder if untrained.
        frozen = encoded.texts is None and not cfg.train_text_encoder
        self.frozen_text_encoder = pipe.text_encoder.to(self.device).eval() if frozen else None
        unet, text_encoder = self._network(pipe)
        trained = [m for m in (unet, text_encoder) if m is not None]
        *models, self.optimizer, self.lr_scheduler = accelerator.prepare(
            *trained, *self._optimizer(unet, text_encoder)
        )
        self.unet, self.text_encoder = (*models, None)[:2]
        for model in models:
            model.train()

    def _network(self, pipe: Any) -> tuple[Any, Any]:
        """Frozen base weights (half precision under mixed precision), fp32 LoRA layers."""
        from diffusers.training_utils import cast_training_params

        cfg, weight_dtype = self.cfg, HALF.get(self.cfg.mixed_precision, torch.float32)
        unet, text_encoder = pipe.unet, pipe.text_encoder if cfg.train_text_encoder else None
        torch.manual_seed(cfg.seed)  # LoRA init draws from the global generator
        add_lora(unet, text_encoder, cfg.network)
        trained = [m for m in (unet, text_encoder) if m is not None]
        if cfg.init_from:
            models = dict(zip(("unet", "text_encoder"), trained, strict=False))
            start, _ = network_state(unet, text_encoder)
            start.update(read_init_weights(cfg.init_from, models, cfg.network))
            load_network_state(unet, text_encoder, start)
            log.info("LoRA initialised from %s", cfg.init_from)
        for model in trained:
            model.to(self.device, dtype=weight_dtype)
        if cfg.gradient_checkpointing:  # recompute activations in backward: less memory
            unet.enable_gradient_checkpointing()
            if text_encoder is not None:
                text_encoder.gradient_checkpointing_enable()
        if weight_dtype != torch.float32:
            cast_training_params(trained, dtype=torch.float32)
            unet.to(memory_format=torch.channels_last)  # measured faster with bf16 on CPU
        return unet, text_encoder

    def _optimizer(self, unet: Any, text_encoder: Any) -> tuple[Any, Any]:
        cfg = self.cfg
        trainable = lambda model: [p for p in model.parameters() if p.requires_grad]  # noqa: E731
        groups = [{"params": trainable(unet), "lr": cfg.unet_lr or cfg.learning_rate}]
        if cfg.train_text_encoder:
            groups.append({"params": trainable(text_encoder), "lr": cfg.text_encoder_lr})
        optimizer = make_optimizer(cfg, groups)
        return optimizer, make_scheduler(cfg, optimizer, self.accelerator.num_processes)

    def _next_batch(self) -> list[int]:
        """The next batch of example indices, all from one bucket (loramill.buckets)."""
        if not self.order:  # new epoch: reshuffle
            cfg = self.cfg
            self.order = batches(self.buckets, cfg.global_batch_size, self.rng, self.times)
        return self.order.pop(0)

    def _latent_dists(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """Mean and std of the batch's latents: cached, or encoded now (cache_latents off)."""
        flips = [False] * len(batch)
        if self.cfg.flip_aug:  # each draw of an image is its mirror image half the time
            flips = (torch.rand(len(batch), generator=self.rng) < 0.5).tolist()
        pairs = list(zip(flips, batch, strict=True))
        if self.vae is None:
            keys = (self.encoded.latent_keys, self.encoded.flipped_keys)
            return load_batch(self.encoded.latents, [keys[flip][i] for flip, i in pairs])
        pixels = torch.cat([read_pixels([self.images[i]], flip) for flip, i in pairs])
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device)).latent_dist
        # contiguous as cached latents are: the UNet's kernels give other bits for other layouts
        return {name: getattr(dist, name).float().cpu().contiguous() for name in ("mean", "std")}

    def _conditioning(self, batch: list[int]) -> torch.Tensor:
        """The text encoder's output for the batch's captions: cached, or encoded now (by the
        trained encoder, or the frozen one when captions change per step)."""
        encoded = self.encoded
        if encoded.texts is not None:
            return load_batch(encoded.texts, [encoded.text_keys[i] for i in batch])["hidden"]
        texts = [self.variation.draw(self.captions[i], self.rng) for i in batch]
        if self.frozen_text_encoder is None:
            return encode_prompts(self.tokenizer, self.text_encoder, texts, self.cfg.conditioning)
        with torch.no_grad():
            return encode_prompts(
                self.tokenizer, self.frozen_text_encoder, texts, self.cfg.conditioning
            )

    def _loss(self, batch: list[int]) -> torch.Tensor:
        encoded, rng, scheduler = self.encoded, self.rng, self.noise_scheduler
        dists = self._latent_dists(batch)
        mean, std = dists["mean"], dists["std"]
        latents = (mean + std * torch.randn(mean.shape, generator=rng)) * encoded.scaling
        noise = objective.sample_noise(latents, self.cfg, rng)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (len(batch),), generator=rng
        )
        noisy = scheduler.add_noise(latents, objective.input_noise(noise, self.cfg, rng), timesteps)
        hidden = self._conditioning(batch)
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        # Every process drew for the whole batch (the same draws: one seed); each trains on
        # its share of the rows, its loss scaled so DDP's mean of gradients is the batch's.
        rows, scale = share(len(batch), self.rank, self.world)
        pred = self.unet(
            noisy[rows].to(self.device), timesteps[rows].to(self.device),
            hidden[rows].to(self.device),
        ).sample  # fmt: skip
        weight = objective.weights(scheduler, timesteps[rows], self.cfg)
        return objective.loss(pred, target[rows].to(self.device), weight, self.cfg) * scale

    def step(self) -> float:
        """One optimizer step over gradient_accumulation_steps batches; the mean loss."""
        accumulation, total = self.cfg.gradient_accumulation_steps, 0.0
        for _ in range(accumulation):
            loss = self._loss(self._next_batch())
            self.accelerator.backward(loss / accumulation)
            # the batch's mean loss: the processes' scaled losses average to it
            total += self.accelerator.reduce(loss.detach(), "mean").item()
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / accumulation

    def lrs(self) -> dict[str, float]:
        names = ("unet", "text_encoder")
        return dict(zip(names, self.lr_scheduler.get_last_lr(), strict=False))

    def unwrapped(self) -> tuple[Any, Any]:
        unwrap = self.accelerator.unwrap_model
        text_encoder = unwrap(self.text_encoder) if self.text_encoder is not None else None
        return unwrap(self.unet), text_encoder

    def adapters(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return network_state(*self.unwrapped())

    def state(self, step: int, history: list[dict[str, Any]]) -> dict[str, Any]:
        scaler = self.accelerator.scaler
        return {
            "step": step,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": self.rng.get_state(),
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "order": [list(batch) for batch in self.order],
            "history": history,
            "device": self.device.type,
        }

    def restore(self, adapters: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        load_network_state(*self.unwrapped(), adapters)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.order = [list(batch) for batch in state["order"]]


def resume(training: Training, run: RunState | None, needed: list[int]) -> tuple[int, list[dict]]:
    """Load the newest usable saved state; return its step and the loss history so far."""
    start = run.resume_point(needed) if run else 0
    if not start:
        return 0, []
    state = run.load_state(start)
    if state["device"] != training.device.type:
        log.warning(
            "state saved on %s, resuming on %s: the result will not be bit-identical "
            "to an uninterrupted run",
            state["device"],
            training.device.type,
        )
    if state["step"] == start:
        training.restore(run.load_adapters(start), state)
    log.info("resumed from step %d", start)
    return start, [r for r in state["history"] if r["step"] <= start]


class CheckpointWriter:
    """Checkpoints, and the samples rendered during training in ``samples/`` beside them."""

    def __init__(
        self, folder: str | os.PathLike, adapter_metadata: dict[str, Any], record: dict[str, Any]
    ) -> None:
        self.folder, self.adapter_metadata, self.written = Path(folder), adapter_metadata, []
        self.provenance = json.dumps(record, sort_keys=True)
        self.samples = self.folder / "samples"

    def restore(self, run: RunState, needed: list[int], start: int) -> None:
        """The checkpoints and samples of the steps a resumed run does not train again."""
        for step in (s for s in needed if s <= start):
            self.write(step, run.load_adapters(step))
        for path in run.sample_files(start):
            write_bytes(self.samples / path.name, path.read_bytes())

    def write(self, step: int, tensors: dict[str, torch.Tensor]) -> None:
        path = self.folder / f"step-{step:06d}.safetensors"
        metadata = {"loramill.step": str(step), "loramill.provenance": self.provenance}
        write_checkpoint(path, tensors, self.adapter_metadata, metadata)
        self.written.append(path)


def train_lora(
    resized_dir: str | os.PathLike,
    captions_jsonl: str | os.PathLike,
    checkpoints_dir: str | os.PathLike,
    logdir: str | os.PathLike,
    base_model: str,
    config: dict[str, Any],
    trigger: str = "",
    allow_unsafe_weights: bool = False,
    device: str = "auto",
    state_dir: str | os.PathLike | None = None,
    loss_png: str | os.PathLike | None = None,
    cache_root: str | os.PathLike = CACHE_ROOT,
    stage: dict[str, Any] | None = None,
) -> list[Path]:
    """Train and write ``step-NNNNNN.safetensors`` checkpoints; return their paths.

    With ``state_dir``, the full state is saved there at every checkpoint step and a rerun
    resumes from it (see loramill.train_state). ``stage``: the train stage's fingerprint and
    its parts, for the checkpoints' provenance (loramill.fingerprints.stage_provenance).
    """
    arguments = dict(locals())  # every argument, for the workers of a multi-process run
    cfg = TrainConfig.from_dict(config)
    if cfg.num_processes > 1 and not in_worker():
        check_gpus(cfg.num_processes, device)
        return [Path(p) for p in launch(train_lora, arguments, cfg.num_processes, cfg.threads)]
    torch.set_num_threads(cfg.threads)
    examples = read_examples(Path(resized_dir), Path(captions_jsonl))
    cfg.check_dataset(len(examples.images))
    if cfg.max_train_epochs:
        epoch = batches_per_epoch(
            examples.buckets, cfg.global_batch_size, examples.times(cfg.repeats)
        )
        cfg = cfg.for_epochs(epoch)
        log.info("%d epochs: %d steps", cfg.max_train_epochs, cfg.max_train_steps)
    accelerator = make_accelerator(cfg, device, logdir)
    accelerator.init_trackers("train", config={k: str(v) for k, v in cfg.as_dict().items()})
    hashes = HashCache(DEFAULT_DB)
    data = f"{hashes.digest(resized_dir)}:{hashes.file(captions_jsonl)}"
    source = (base_model, trigger, allow_unsafe_weights, data)
    training, record = prepare(cfg, accelerator, examples, source, Path(cache_root), hashes)
    record |= {"stage": stage} if stage else {}
    run = RunState(state_dir) if state_dir else None
    total = cfg.max_train_steps
    needed = checkpoint_steps(total, cfg.save_steps)
    start, history = resume(training, run, needed)
    main = accelerator.is_main_process  # only it writes checkpoints, state and the curve
    writer = CheckpointWriter(checkpoints_dir, training.adapters()[1], record)
    if run and main:
        writer.restore(run, needed, start)

    log.info("training: %d images in %d bucket(s), steps %d → %d",
             len(examples.images), len(set(examples.buckets)), start, total)  # fmt: skip
    history = run_steps(training, start, history, writer, run if main else None, needed)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if loss_png and main:
        plot_loss(history, loss_png, "training loss", checkpoints=needed)
    if run and main:
        run.finish(keep=cfg.continues)
    return writer.written


def prepare(
    cfg: TrainConfig,
    accelerator: Any,
    examples: Examples,
    source: tuple[str, str, bool, str],
    cache_root: Path,
    hashes: HashCache,
) -> tuple[Training, dict[str, Any]]:
    """The run's models and encoded data, and its provenance record. ``source``: the base
    model, the trigger, whether pickle weights may load, and the data's fingerprint."""
    base_model, trigger, allow_unsafe_weights, data_fingerprint = source
    device = accelerator.device
    record = provenance(trigger, base_model, cfg, examples, data_fingerprint, device.type, hashes)
    pipe = load_pipeline(base_model, "float32", allow_unsafe_weights)
    use_sdpa(pipe, cfg.sdpa)
    record["base_version"] = base_version(pipe)  # what the export labels the adapter
    with accelerator.main_process_first():  # one process encodes, the others read the cache
        encoded = Encoded(pipe, examples, cfg, base_model, device, cache_root, hashes)
        hashes.save()
    samples = None
    if cfg.sample_every_n_steps:
        prompts = sample_prompts(cfg, trigger, examples.resolution)
        samples = SampleRenderer(cfg, pipe, prompts)
    # Past here only Training keeps references: the VAE, the frozen text encoder and the
    # sample renderer's parts when they are needed, nothing else.
    return Training(cfg, accelerator, pipe, encoded, examples, samples), record


def run_steps(
    training: Training,
    start: int,
    history: list[dict],
    writer: CheckpointWriter,
    run: RunState | None,
    needed: list[int],
) -> list[dict]:
    """Train from ``start`` to the last step, writing checkpoints (and states) at ``needed``;
    return the whole loss history. Asked to stop (loramill.stopping), it saves the state at
    the step boundary and raises :class:`Interrupted`."""
    total = training.cfg.max_train_steps
    progress = Progress(training.accelerator, total, start, history)
    main = training.accelerator.is_main_process
    try:  # the bar closed whatever ends the loop (an error, a stop)
        with StopRequest() as stop:
            for step in range(start + 1, total + 1):
                loss = training.step()
                if not math.isfinite(loss):
                    raise LoramillError(f"train: loss became {loss} at step {step}")
                progress.update(step, loss, training.lrs())
                if training.samples and training.samples.due(step) and main:
                    images = training.samples.render(*training.unwrapped(), training.accelerator)
                    folders = [writer.samples] + ([run.samples] if run else [])
                    save_samples(images, step, folders, training.accelerator)
                why = stop_reason(training, stop) if step < total else None
                if (step in needed or why) and main:
                    tensors, _ = training.adapters()
                    if step in needed:
                        writer.write(step, tensors)
                    if run:
                        run.save(step, tensors, training.state(step, progress.history))
                if why:
                    raise Interrupted(why, step, saved=run is not None)
    finally:
        progress.close()
    return progress.history


def stop_reason(training: Training, stop: StopRequest) -> str | None:
    """Why to stop after this step, agreed by every process of a multi-process run (they all
    stop at the same step, or the others would wait for it forever)."""
    why = stop.requested()
    if training.world > 1:
        flag = torch.tensor([0.0 if why is None else 1.0], device=training.device)
        if training.accelerator.reduce(flag, "sum").item() and why is None:
            why = "another process was asked to stop"
    return why
