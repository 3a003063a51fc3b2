"""One training step and what it needs: the accelerator, the LoRA network on the base model,
the batch (cached latents, caption embeddings), the loss and the update, and the state a
resumed run restores (loramill.train.loop runs the steps).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from loramill.devices import resolve_device
from loramill.models.base_model import pipeline_family, text_parts
from loramill.models.block_swap import swap_blocks
from loramill.models.checkpoint import (
    load_network_state,
    network_state,
)
from loramill.models.float8 import check_float8_device, store_float8
from loramill.models.network import add_lora, block_lrs, keep_input_dtype, unet_blocks
from loramill.models.quantize import check_quantize_device, quantize_linears
from loramill.prepare.buckets import batches
from loramill.train.caption_variation import CaptionVariation
from loramill.train.config import TrainConfig, text_encoder_lrs
from loramill.train.data import Encoded, Examples
from loramill.train.distributed import share
from loramill.train.ema import AdapterAverage
from loramill.train.family_options import check_guidance
from loramill.train.flow_matching import FlowObjective
from loramill.train.init_from import read_init_weights
from loramill.train.latents import load_batch, read_pixels
from loramill.train.masks import batch_masks, mask_paths
from loramill.train.objective import NoisePrediction
from loramill.train.optimizers import make_optimizer, make_scheduler, param_groups
from loramill.train.samples import SampleRenderer

log = logging.getLogger(__name__)


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def base_dtypes(cfg: TrainConfig, family: Any) -> str | dict[str, str]:
    """What the base model loads in: the frozen weights a run keeps in half precision load in
    it (a float32 copy of SDXL's UNet alone is 10 GB, of Flux's transformer 48 GB, of its T5
    19 GB); the VAE and the other frozen text encoders in float32, the dtype the caches are
    filled in."""
    half = {"fp16": "float16", "bf16": "bfloat16"}.get(cfg.mixed_precision)
    if half is None:
        return "float32"
    trained = (family.denoiser, *(family.trainable_encoders if cfg.train_text_encoder else ()))
    return {"default": "float32", **dict.fromkeys((*trained, *family.half_encoders), half)}


def make_accelerator(cfg: TrainConfig, device_spec: str, logdir: str | os.PathLike) -> Any:
    from accelerate import Accelerator, DistributedDataParallelKwargs
    from accelerate.state import AcceleratorState

    device = resolve_device(device_spec)
    cfg.check_device(device.type)
    # accelerate keeps its settings in a process-wide singleton; a second training in one
    # process (tests, notebooks) with other settings must start from a clean one.
    AcceleratorState._reset_state(reset_partial_state=True)
    # A trained text encoder read below its last layer (SDXL's penultimate states, clip_skip)
    # has LoRA layers no loss reaches, as in kohya's network: DDP must be told to expect them.
    unused = DistributedDataParallelKwargs(find_unused_parameters=cfg.train_text_encoder)
    return Accelerator(
        mixed_precision=cfg.mixed_precision,
        cpu=device.type == "cpu",
        log_with="tensorboard",
        project_dir=str(logdir),
        kwargs_handlers=[unused],
    )


def make_objective(cfg: TrainConfig, family: Any, pipe: Any) -> Any:
    """What the run minimises: flow matching for a transformer (Flux), DDPM noise prediction
    for a UNet."""
    if family.denoiser == "transformer":
        check_guidance(cfg, family.guidance_embeds)
        return FlowObjective(cfg, family)
    return NoisePrediction(cfg, family, pipe.scheduler.config)


def network_models(cfg: TrainConfig, family: Any, pipe: Any, device: Any) -> dict[str, Any]:
    """The components a run trains (by pipeline name), with their LoRA layers: frozen base
    weights (half precision under mixed precision), fp32 LoRA layers, on ``device``."""
    from diffusers.training_utils import cast_training_params

    weight_dtype = HALF.get(cfg.mixed_precision, torch.float32)
    denoiser = family.denoiser
    encoders = family.trainable_encoders if cfg.train_text_encoder else ()
    names = (denoiser, *encoders)
    models = {name: getattr(pipe, name) for name in names}
    torch.manual_seed(cfg.seed)  # LoRA init draws from the global generator
    add_lora(models, cfg.network)
    if cfg.init_from:
        start, _ = network_state(models)
        start.update(read_init_weights(cfg.init_from, models, cfg.network))
        load_network_state(models, start)
        log.info("LoRA initialised from %s", cfg.init_from)
    place_weights(cfg, models, denoiser, device, weight_dtype)
    if cfg.gradient_checkpointing:  # recompute activations in backward: less memory
        models[denoiser].enable_gradient_checkpointing()
        for name in names[1:]:
            models[name].gradient_checkpointing_enable()
    if weight_dtype != torch.float32:  # mixed precision: every forward runs under autocast
        cast_training_params(list(models.values()), dtype=torch.float32)
        keep_input_dtype(list(models.values()))
        if denoiser == "unet":  # faster with bf16 on CPU
            models[denoiser].to(memory_format=torch.channels_last)
    return models


def place_weights(cfg: TrainConfig, models: dict, denoiser: str, device: Any, dtype: Any) -> None:
    """Every model on ``device`` in ``dtype``, but for the denoiser's frozen weights that are
    quantized (quantize_base), stored in float8 (fp8_base) or wait in host memory between
    uses (blocks_to_swap)."""
    if cfg.quantize_base:  # before the move, which quantizes weight by weight
        check_quantize_device(device)
        count = quantize_linears(models[denoiser], cfg.quantize_base, dtype)
        log.info("quantize_base: %d Linear weights in %s", count, cfg.quantize_base)
    # before the move, so the swapped blocks' frozen weights never go to the device whole
    swap = swap_blocks(models[denoiser], cfg.blocks_to_swap, device, dtype)
    if cfg.fp8_base:  # float8 before the move: the device never holds the bf16 weights
        check_float8_device(device)
        for model in models.values():
            model.to(dtype=dtype)
        # (the swapped blocks' host copies too: they are their modules' weights)
        log.info("fp8_base: %d Linear weights in float8", store_float8(models[denoiser]))
    for model in models.values():  # (a dtype would cast float8 weights back)
        model.to(device, dtype=None if cfg.fp8_base else dtype)
    if swap:
        swap.pin()  # in their final dtype


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
        self.cfg, self.accelerator = cfg, accelerator
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.encoded, self.captions, self.buckets = encoded, examples.captions, examples.buckets
        self.images, self.times = examples.images, examples.times(cfg.repeats)
        self.family, self.entries = pipeline_family(pipe), examples.entries
        self.device = accelerator.device
        self.vae = None if cfg.cache_latents else pipe.vae.to(self.device).eval()
        self.samples = samples
        self.masks = mask_paths(cfg, examples.images, examples.entries)  # train.masked_loss
        # prior_loss_weight: regularization images' loss weight, when it is not 1
        prior = cfg.prior_loss_weight if any(examples.reg) and cfg.prior_loss_weight != 1 else None
        self.loss_weights = None if prior is None else [prior if r else 1.0 for r in examples.reg]
        self.rng = torch.Generator().manual_seed(cfg.seed)  # every draw of the loop
        self.order: list[list[int]] = []  # the epoch's batches still to train on
        self.objective = make_objective(cfg, self.family, pipe)
        self.tokenizers, encoders = text_parts(pipe)
        self.variation = CaptionVariation(cfg)
        # Captions that vary per step are encoded per step, by the frozen encoders those the
        # run does not train.
        trained_encoders = self.family.trainable_encoders if cfg.train_text_encoder else ()
        self.frozen_text_encoders = {
            name: encoder.to(self.device).eval()
            for name, encoder in zip(self.family.text_encoders, encoders, strict=True)
            if encoded.texts is None and name not in trained_encoders
        }
        trained = self._network(pipe)
        *models, self.optimizer, self.lr_scheduler = accelerator.prepare(
            *trained.values(), *self._optimizer(trained)
        )
        self.models = dict(zip(trained, models, strict=True))  # component name → model
        for model in models:
            model.train()
        self.average = None
        if cfg.ema:  # after the weights are in place: from init_from's too
            settings = (cfg.ema_decay, cfg.ema_update_step_interval, cfg.ema_device)
            self.average = AdapterAverage(self.models, *settings)

    def _network(self, pipe: Any) -> dict[str, Any]:
        return network_models(self.cfg, self.family, pipe, self.device)

    def _optimizer(self, models: dict[str, Any]) -> tuple[Any, Any]:
        """One parameter group per trained component, each at its learning rate (with kohya's
        block learning rates one per UNet block, with LoRA+ twice as many:
        loramill.train.optimizers.param_groups)."""
        cfg, denoiser = self.cfg, self.family.denoiser
        rates = {denoiser: cfg.unet_lr or cfg.learning_rate, **text_encoder_lrs(cfg, models)}
        ratios = dict.fromkeys(models, cfg.loraplus_text_encoder_lr_ratio or cfg.loraplus_lr_ratio)
        ratios[denoiser] = cfg.loraplus_unet_lr_ratio or cfg.loraplus_lr_ratio
        blocks = {}
        if denoiser == "unet" and (weights := block_lrs(models[denoiser], cfg.network)):
            blocks[denoiser] = (unet_blocks(models[denoiser]), weights)
        groups, self.group_names = param_groups(models, rates, ratios, blocks)
        optimizer = make_optimizer(cfg, groups)
        return optimizer, make_scheduler(cfg, optimizer, self.accelerator.num_processes)

    def _next_batch(self) -> list[int]:
        """The next batch of example indices, all from one bucket (loramill.prepare.buckets)."""
        if not self.order:  # new epoch: reshuffle
            cfg = self.cfg
            self.order = batches(self.buckets, cfg.global_batch_size, self.rng, self.times)
        return self.order.pop(0)

    def _flips(self, batch: list[int]) -> list[bool]:
        """Which of the batch's images are drawn mirrored: half the time with flip_aug."""
        if not self.cfg.flip_aug:
            return [False] * len(batch)
        return (torch.rand(len(batch), generator=self.rng) < 0.5).tolist()

    def _latent_dists(self, batch: list[int], flips: list[bool]) -> dict[str, torch.Tensor]:
        """Mean and std of the batch's latents: cached, or encoded now (cache_latents off)."""
        pairs = list(zip(flips, batch, strict=True))
        if self.vae is None:
            keys = (self.encoded.latent_keys, self.encoded.flipped_keys)
            return load_batch(self.encoded.latents, [keys[flip][i] for flip, i in pairs])
        pixels = torch.cat([read_pixels([self.images[i]], flip) for flip, i in pairs])
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device)).latent_dist
        # contiguous as cached latents are: the UNet's kernels give other bits for other layouts
        return {name: getattr(dist, name).float().cpu().contiguous() for name in ("mean", "std")}

    def _conditioning(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """The text encoders' output for the batch's captions: cached, or encoded now (by the
        trained encoders, or the frozen ones when captions change per step)."""
        encoded = self.encoded
        if encoded.texts is not None:
            return load_batch(encoded.texts, [encoded.text_keys[i] for i in batch])
        texts = [self.variation.draw(self.captions[i], self.rng) for i in batch]
        family, frozen = self.family, self.frozen_text_encoders
        encoders = [frozen[n] if n in frozen else self.models[n] for n in family.text_encoders]
        how = family.conditioning(self.cfg)
        with torch.set_grad_enabled(len(frozen) < len(encoders)):  # a trained encoder's grads
            return family.encode(self.tokenizers, encoders, texts, how)

    def _latents(self, batch: list[int], flips: list[bool]) -> torch.Tensor:
        """A draw of the batch's latents, shifted and scaled as the denoiser reads them."""
        encoded, dists = self.encoded, self._latent_dists(batch, flips)
        mean, std = dists["mean"], dists["std"]
        latents = mean + std * torch.randn(mean.shape, generator=self.rng)
        if encoded.shift:  # Flux's VAE centres its latents
            latents = latents - encoded.shift
        return latents * encoded.scaling

    def _loss(self, batch: list[int]) -> torch.Tensor:
        flips = self._flips(batch)
        latents = self._latents(batch, flips)
        mask = batch_masks([self.masks[i] for i in batch], flips, latents.shape[-2:])
        noised = self.objective.noised(latents, self.rng)
        conditioning = self._conditioning(batch)
        sizes = self.family.size_conditions([self.entries[i] for i in batch])
        # Every process drew for the whole batch (the same draws: one seed); each trains on
        # its share of the rows, its loss scaled so DDP's mean of gradients is the batch's.
        rows, scale = share(len(batch), self.rank, self.world)
        on_device = lambda t: t[rows].to(self.device)  # noqa: E731
        pred = self.objective.predict(
            self.models[self.family.denoiser],
            on_device(noised.noisy),
            on_device(noised.level),
            {name: on_device(value) for name, value in conditioning.items()},
            None if sizes is None else on_device(sizes),
        )
        mask = None if mask is None else on_device(mask)
        target, level = on_device(noised.target), noised.level[rows]
        weight = None
        if self.loss_weights is not None:
            weight = torch.tensor([self.loss_weights[i] for i in batch])[rows]
        return self.objective.loss(pred, target, level, mask, weight) * scale

    def step(self) -> float:
        """One optimizer step over gradient_accumulation_steps batches; the mean loss."""
        accumulation, total = self.cfg.gradient_accumulation_steps, 0.0
        for _ in range(accumulation):
            loss = self._loss(self._next_batch())
            self.accelerator.backward(loss / accumulation)
            # the batch's mean loss: the processes' scaled losses average to it
            total += self.accelerator.reduce(loss.detach(), "mean").item()
        # in the models' order, whatever the groups (LoRA+ splits them): the norm's sum is too
        params = [p for m in self.models.values() for p in m.parameters() if p.requires_grad]
        self.accelerator.clip_grad_norm_(params, self.cfg.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.average is not None:
            self.average.update()
        return total / accumulation

    def lrs(self) -> dict[str, float]:
        return dict(zip(self.group_names, self.lr_scheduler.get_last_lr(), strict=True))

    def unwrapped(self) -> dict[str, Any]:
        """The trained models by component name, unwrapped from DDP."""
        return {name: self.accelerator.unwrap_model(m) for name, m in self.models.items()}

    def adapters(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return network_state(self.unwrapped())

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
            "ema": None if self.average is None else self.average.state(self.unwrapped()),
        }

    def restore(self, adapters: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        load_network_state(self.unwrapped(), adapters)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.rng.set_state(state["rng"])
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.order = [list(batch) for batch in state["order"]]
        if self.average is not None:
            self.average.restore(self.unwrapped(), state["ema"])
