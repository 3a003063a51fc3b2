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
from loramill.models.checkpoint import (
    load_network_state,
    network_state,
)
from loramill.models.network import add_lora
from loramill.prepare.buckets import batches
from loramill.train import objective
from loramill.train.caption_variation import CaptionVariation
from loramill.train.config import TrainConfig
from loramill.train.data import Encoded, Examples
from loramill.train.distributed import share
from loramill.train.init_from import read_init_weights
from loramill.train.latents import encode_prompts, load_batch, read_pixels
from loramill.train.optimizers import make_optimizer, make_scheduler
from loramill.train.samples import SampleRenderer

log = logging.getLogger(__name__)


HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


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
        """The next batch of example indices, all from one bucket (loramill.prepare.buckets)."""
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
