"""Stage 4: train a LoRA adapter (peft) on a dataset's resized images and merged captions.

One readable loop in the style of diffusers' train_text_to_image_lora example, changed where
real datasets need it:

- memory is bounded by the batch: latents (and, with a frozen text encoder, text embeddings)
  are encoded once into a content-keyed disk cache (loramill.train.latents) and read per batch;
- mixed precision through accelerate: frozen weights in half precision, LoRA parameters and
  optimizer state in float32;
- exact resume: every checkpoint step saves the full state outside Snakemake's outputs
  (loramill.train.state); a rerun continues from it bit for bit, and so does a longer run.

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
from loramill.captions.merge import tag_frequency
from loramill.devices import resolve_device
from loramill.files import write_bytes
from loramill.hashing import DEFAULT_DB, HashCache
from loramill.model_files import base_model_fingerprint
from loramill.models.base_model import (
    base_family,
    load_pipeline,
    model_folder,
    pipeline_family,
    use_sdpa,
)
from loramill.models.block_swap import transformer_counts
from loramill.models.checkpoint import (
    AVERAGE_KEY,
    AVERAGE_PREFIX,
    step_metadata,
    step_name,
    write_checkpoint,
)
from loramill.models.quantize import LIBRARY as QUANTIZING_LIBRARY
from loramill.models.single_file import source_checkpoint
from loramill.prepare.buckets import batches_per_epoch
from loramill.software import installed
from loramill.train.config import REG_OPTIONS, TrainConfig
from loramill.train.data import Encoded, Examples, read_examples, split, subset
from loramill.train.distributed import check_gpus, in_worker, launch
from loramill.train.ema import average_about
from loramill.train.family_options import check_family_options
from loramill.train.latents import CACHE_ROOT
from loramill.train.progress import Progress, plot_loss
from loramill.train.regularization import with_regularization
from loramill.train.samples import SampleRenderer, sample_prompts, save_samples
from loramill.train.state import RunState
from loramill.train.step import Training, base_dtypes, make_accelerator
from loramill.train.stopping import REASONS, Interrupted, StopRequest

log = logging.getLogger(__name__)


def provenance(
    trigger: str,
    base_model: str,
    cfg: TrainConfig,
    examples: Examples,
    data_fingerprint: str,
    device: str,
    hashes: HashCache,
    allow_unsafe_weights: bool = False,
) -> dict[str, Any]:
    trained = subset(examples, [not reg for reg in examples.reg])  # the dataset's own
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
            "base_model_hash": base_model_fingerprint(base_model, hashes, allow_unsafe_weights),
            "train_config": cfg.as_dict(),
            "seed": cfg.seed,
            "resolution": examples.resolution,
            "buckets": dict(Counter(f"{w}x{h}" for w, h in sorted(trained.buckets))),
            "num_images": len(trained.captions),
            "num_reg_images": len(examples.captions) - len(trained.captions),
            # what an epoch is (the export's ss_epoch): batches over every image × repeats
            "batches_per_epoch": batches_per_epoch(
                examples.buckets, cfg.global_batch_size, examples.times(cfg.repeats)
            ),
            "tag_frequency": tag_frequency(trained.captions),
            "device": device,
            "versions": installed() | (installed(QUANTIZING_LIBRARY) if cfg.quantize_base else {}),
        }
        | init_from
        | single_file
    )


def in_workers(arguments: dict[str, Any], cfg: TrainConfig, device: str) -> list[Path]:
    """train_lora in ``cfg.world_size`` DDP workers; rank 0's checkpoints."""
    check_gpus(cfg.num_processes, resolve_device(device))
    cfg.check_machines()
    processes = (cfg.num_processes, cfg.threads, cfg.num_machines, cfg.rdzv_endpoint)
    return [Path(p) for p in launch(train_lora, arguments, *processes)]


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

    def restore(
        self, run: RunState, needed: list[int], start: int, history: list[dict[str, Any]]
    ) -> None:
        """The checkpoints and samples of the steps a resumed run does not train again."""
        for step in (s for s in needed if s <= start):
            loss = interval_loss(history, needed, step)
            self.write(step, run.load_adapters(step), run.load_average(step), loss)
        for path in run.sample_files(start):
            write_bytes(self.samples / path.name, path.read_bytes())

    def write(
        self,
        step: int,
        tensors: dict[str, torch.Tensor],
        average: tuple[dict[str, torch.Tensor], str] | None = None,
        loss: float | None = None,
    ) -> None:
        """The step's checkpoint and, with ``average`` (train.ema's tensors and what they are),
        the moving average's beside it, saying so in its metadata. ``loss``: the mean training
        loss since the previous checkpoint, which the validation plot sets beside its own."""
        path = self.folder / step_name(step)
        metadata = step_metadata(step, self.provenance, loss)
        write_checkpoint(path, tensors, self.adapter_metadata, metadata)
        self.written.append(path)
        if average is not None:
            metadata[AVERAGE_KEY] = average[1]
            write_checkpoint(self.folder / (AVERAGE_PREFIX + path.name), average[0],
                             self.adapter_metadata, metadata)  # fmt: skip


def training_examples(
    folders: list[tuple[Any, Any]], cfg: TrainConfig, hashes: HashCache
) -> tuple[Examples, str]:
    """What a run trains on — the dataset's examples less what validation_split holds out,
    then its regularization images at kohya's ratio — and the data's fingerprint.
    ``folders``: the resized folder and captions of the dataset, then of its regularization
    images (None, None without)."""
    (resized_dir, captions_jsonl), (reg_dir, reg_captions) = folders
    examples = read_examples(Path(resized_dir), Path(captions_jsonl))
    examples = held_out_for_validation(examples, cfg, hashes)
    data = f"{hashes.digest(resized_dir)}:{hashes.file(captions_jsonl)}"
    if reg_dir is None:
        for key, unset in REG_OPTIONS.items():
            if getattr(cfg, key) != unset:
                raise LoramillError(f"train.{key}: no regularization images were given")
        return examples, data
    reg = read_examples(Path(reg_dir), Path(reg_captions))
    data += f":{hashes.digest(reg_dir)}:{hashes.file(reg_captions)}"
    return with_regularization(examples, reg, cfg), data


def held_out_for_validation(examples: Examples, cfg: TrainConfig, hashes: HashCache) -> Examples:
    """The examples left to train on once validation_split has held its share out."""
    kept, held = split(examples, cfg.validation_split, hashes)
    if held.images:
        log.info("validation_split %g: %d of %d images held out for validation",
                 cfg.validation_split, len(held.images), len(examples.images))  # fmt: skip
    return kept


def in_steps(cfg: TrainConfig, examples: Examples) -> TrainConfig:
    """``max_train_epochs`` as a number of steps, for this dataset's buckets and repeats."""
    if not cfg.max_train_epochs:
        return cfg
    epoch = batches_per_epoch(examples.buckets, cfg.global_batch_size, examples.times(cfg.repeats))
    cfg = cfg.for_epochs(epoch)
    log.info("%d epochs: %d steps", cfg.max_train_epochs, cfg.max_train_steps)
    return cfg


def train_lora(
    resized_dir: str | os.PathLike,
    captions_jsonl: str | os.PathLike,
    checkpoints_dir: str | os.PathLike,
    logdir: str | os.PathLike,
    base_model: str,
    config: dict[str, Any],
    trigger: str = "",
    reg_resized_dir: str | os.PathLike | None = None,
    reg_captions_jsonl: str | os.PathLike | None = None,
    allow_unsafe_weights: bool = False,
    device: str = "auto",
    family: str = "auto",
    state_dir: str | os.PathLike | None = None,
    loss_png: str | os.PathLike | None = None,
    cache_root: str | os.PathLike = CACHE_ROOT,
    stage: dict[str, Any] | None = None,
) -> list[Path]:
    """Train and write ``step-NNNNNN.safetensors`` checkpoints; return their paths.

    With ``state_dir``, the full state is saved there at every checkpoint step and a rerun
    resumes from it (see loramill.train.state). ``stage``: the train stage's fingerprint and
    its parts, for the checkpoints' provenance (loramill.reruns.fingerprints.stage_provenance).
    ``family``: ``base_model_family`` (loramill.models.families), checked against the model.
    ``reg_resized_dir``, ``reg_captions_jsonl``: regularization images, prepared as a
    dataset's (loramill.train.regularization).
    """
    arguments = dict(locals())  # every argument, for the workers of a multi-process run
    cfg = TrainConfig.from_dict(config)
    if cfg.world_size > 1 and not in_worker():
        return in_workers(arguments, cfg, device)
    torch.set_num_threads(cfg.threads)
    hashes = HashCache(DEFAULT_DB)
    folders = [(resized_dir, captions_jsonl), (reg_resized_dir, reg_captions_jsonl)]
    examples, data = training_examples(folders, cfg, hashes)
    cfg.check_dataset(len(examples.images))
    cfg = in_steps(cfg, examples)
    accelerator = make_accelerator(cfg, device, logdir)
    accelerator.init_trackers("train", config={k: str(v) for k, v in cfg.as_dict().items()})
    source = (base_model, trigger, allow_unsafe_weights, data, family)
    training, record = prepare(cfg, accelerator, examples, source, Path(cache_root), hashes)
    record |= {"stage": stage} if stage else {}
    run = RunState(state_dir) if state_dir else None
    total = cfg.max_train_steps
    needed = cfg.checkpoint_steps
    start, history = resume(training, run, needed)
    main = accelerator.is_main_process  # only it writes checkpoints, state and the curve
    writer = CheckpointWriter(checkpoints_dir, training.adapters()[1], record)
    if run and main:
        writer.restore(run, needed, start, history)

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
    source: tuple[str, str, bool, str, str],
    cache_root: Path,
    hashes: HashCache,
) -> tuple[Training, dict[str, Any]]:
    """The run's models and encoded data, and its provenance record. ``source``: the base
    model, the trigger, whether pickle weights may load, the data's fingerprint and the
    family the config states."""
    base_model, trigger, allow_unsafe_weights, data_fingerprint, family = source
    device = accelerator.device
    record = provenance(trigger, base_model, cfg, examples, data_fingerprint, device.type,
                        hashes, allow_unsafe_weights)  # fmt: skip
    base = base_family(base_model, family)
    check_family_options(cfg, base.name)  # a hub model's family is known first here
    dtypes = base_dtypes(cfg, base)
    pipe = load_pipeline(base_model, dtypes, allow_unsafe_weights, family)
    use_sdpa(pipe, cfg.sdpa)
    if cfg.blocks_to_swap:  # a count the transformer cannot take stops before the caches fill
        transformer_counts(pipe.transformer, cfg.blocks_to_swap)
    code = pipeline_family(pipe)
    record["family"] = code.name
    record["base_version"] = code.version(pipe)  # what the export labels the adapter
    with accelerator.main_process_first():  # one process encodes, the others read the cache
        encoded = Encoded(pipe, examples, cfg, base_model, device, cache_root, hashes)
        hashes.save()
    samples = None
    if cfg.sample_every_n_steps:
        prompts = sample_prompts(cfg, trigger, examples.resolution, code.sample_guidance)
        samples = SampleRenderer(cfg, pipe, prompts)
    # Past here only Training keeps references: the VAE, the frozen text encoder and the
    # sample renderer's parts when they are needed, nothing else.
    return Training(cfg, accelerator, pipe, encoded, examples, samples), record


def interval_loss(history: list[dict[str, Any]], needed: list[int], step: int) -> float | None:
    """The mean training loss of the steps after the checkpoint before ``step``, up to it."""
    before = max((s for s in needed if s < step), default=0)
    losses = [r["loss"] for r in history if before < r["step"] <= step]
    return sum(losses) / len(losses) if losses else None


def run_steps(
    training: Training,
    start: int,
    history: list[dict],
    writer: CheckpointWriter,
    run: RunState | None,
    needed: list[int],
) -> list[dict]:
    """Train from ``start`` to the last step, writing checkpoints (and states) at ``needed``;
    return the whole loss history. Asked to stop (loramill.train.stopping), it saves the state at
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
                    images = training.samples.render(training.unwrapped(), training.accelerator)
                    folders = [writer.samples] + ([run.samples] if run else [])
                    save_samples(images, step, folders, training.accelerator)
                why = stop_reason(training, stop) if step < total else None
                if (step in needed or why) and main:
                    tensors, _ = training.adapters()
                    state = training.state(step, progress.history)
                    if step in needed:
                        ema = state["ema"]
                        average = None if ema is None else (ema["tensors"], average_about(ema))
                        loss_since = interval_loss(progress.history, needed, step)
                        writer.write(step, tensors, average, loss_since)
                    if run:
                        run.save(step, tensors, state)
                if why:
                    raise Interrupted(why, step, saved=run is not None)
    finally:
        progress.close()
    return progress.history


def stop_reason(training: Training, stop: StopRequest) -> str | None:
    """Why to stop after this step, agreed by every process of a multi-process run: they all
    stop at the same step (or the others would wait for it forever), and all give the reason
    of the lowest rank that has one (a signal to the job reaches its workers one by one)."""
    why = stop.requested()
    if training.world > 1:
        code = torch.tensor([REASONS.index(why)], device=training.device)
        why = next((REASONS[c] for c in training.accelerator.gather(code).tolist() if c), None)
    return why
