"""Stage 4: train a LoRA adapter (peft) on a dataset's resized images and merged captions.

One readable loop in the style of diffusers' train_text_to_image_lora example: frozen base
model, LoRA on the UNet attention projections (text encoder optional), noise-prediction loss
against the model's own noise scheduler. Every random draw comes from one seeded CPU generator,
so the same inputs and config give a bit-identical adapter on CPU.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loramill import LoramillError, __version__
from loramill.files import read_jsonl
from loramill.hashing import hash_file, hash_tree
from loramill.lora import add_lora, save_checkpoint
from loramill.merge import tag_frequency
from loramill.model import base_model_hash, load_pipeline
from loramill.resize import MANIFEST

log = logging.getLogger(__name__)
VERSIONED = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 8
    alpha: float = 8.0
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-5
    train_text_encoder: bool = False
    max_train_steps: int = 100
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    save_steps: int = 50
    seed: int = 42
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    noise_offset: float = 0.0
    dtype: str = "float32"
    # CPU kernels split reductions by thread count, so it is part of what makes a run
    # bit-reproducible: fixed here rather than taken from the scheduler.
    threads: int = 2

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise LoramillError(f"train.{unknown[0]}: unknown option")
        return cls(**config)


def checkpoint_steps(max_train_steps: int, save_steps: int) -> list[int]:
    """Steps at which checkpoints are written: every save_steps, and always the last step."""
    return sorted({*range(save_steps, max_train_steps + 1, save_steps), max_train_steps})


def library_versions() -> dict[str, str]:
    import importlib.metadata as md

    return {"loramill": __version__} | {name: md.version(name) for name in VERSIONED}


def load_training_images(resized_dir: Path, captions_jsonl: Path) -> tuple[torch.Tensor, list[str]]:
    """Images as a [-1, 1] float tensor (N, 3, H, W) and their captions, in caption order."""
    manifest = json.loads((resized_dir / MANIFEST).read_text())
    available = {entry["file"] for entry in manifest["images"]}
    records = read_jsonl(captions_jsonl)
    missing = [r["image"] for r in records if r["image"] not in available]
    if missing:
        raise LoramillError(f"{captions_jsonl}: caption for unknown image '{missing[0]}'")
    if not records:
        raise LoramillError(f"{captions_jsonl}: no captioned images to train on")
    arrays = [np.asarray(Image.open(resized_dir / r["image"]).convert("RGB")) for r in records]
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return pixels, [r["caption"] for r in records]


def provenance(
    dataset: str,
    trigger: str,
    resized_dir: Path,
    captions_jsonl: Path,
    base_model: str,
    config: TrainConfig,
    captions: list[str],
) -> dict[str, Any]:
    resolution = json.loads((resized_dir / MANIFEST).read_text())["resolution"]
    return {
        "dataset": dataset,
        "trigger": trigger,
        "data_fingerprint": hash_tree(resized_dir) + ":" + hash_file(captions_jsonl),
        "base_model": base_model,
        "base_model_hash": base_model_hash(base_model),
        "train_config": asdict(config),
        "seed": config.seed,
        "resolution": resolution,
        "num_images": len(captions),
        "tag_frequency": tag_frequency(captions),
        "versions": library_versions(),
    }


def encode_prompts(tokenizer: Any, text_encoder: Any, captions: list[str]) -> torch.Tensor:
    tokens = tokenizer(
        captions,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    return text_encoder(tokens)[0]


def train_lora(
    resized_dir: str | os.PathLike,
    captions_jsonl: str | os.PathLike,
    checkpoints_dir: str | os.PathLike,
    logdir: str | os.PathLike,
    base_model: str,
    config: dict[str, Any],
    dataset: str,
    trigger: str = "",
    allow_unsafe_weights: bool = False,
) -> list[Path]:
    """Train and write ``step-NNNNNN.safetensors`` checkpoints; return their paths."""
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler

    cfg = TrainConfig.from_dict(config)
    torch.set_num_threads(cfg.threads)
    resized_dir, captions_jsonl = Path(resized_dir), Path(captions_jsonl)
    checkpoints_dir = Path(checkpoints_dir)
    pixels, captions = load_training_images(resized_dir, captions_jsonl)
    record = provenance(dataset, trigger, resized_dir, captions_jsonl, base_model, cfg, captions)

    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with="tensorboard",
        project_dir=str(logdir),
    )
    accelerator.init_trackers(dataset, config={k: str(v) for k, v in asdict(cfg).items()})
    torch.manual_seed(cfg.seed)  # LoRA weight init draws from the global generator
    rng = torch.Generator().manual_seed(cfg.seed)  # every other draw comes from here

    pipe = load_pipeline(base_model, cfg.dtype, allow_unsafe_weights)
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    add_lora(unet, text_encoder if cfg.train_text_encoder else None, cfg.rank, cfg.alpha)
    device = accelerator.device
    for module in (unet, vae, text_encoder):
        module.to(device)

    # The VAE is frozen and there is no augmentation, so each image's latent distribution is
    # computed once; a fresh sample is still drawn every step, as the diffusers example does.
    with torch.no_grad():
        dist = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        latent_mean, latent_std = dist.mean.float().cpu(), dist.std.float().cpu()
        prompt_embeds = (
            None if cfg.train_text_encoder else encode_prompts(tokenizer, text_encoder, captions)
        )
    scaling = vae.config.scaling_factor

    groups = [
        {"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}
    ]
    if cfg.train_text_encoder:
        text_params = [p for p in text_encoder.parameters() if p.requires_grad]
        groups.append({"params": text_params, "lr": cfg.text_encoder_lr})
    optimizer = torch.optim.AdamW(groups)
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=cfg.max_train_steps * accelerator.num_processes,
    )
    unet, text_encoder, optimizer, lr_scheduler = accelerator.prepare(
        unet, text_encoder, optimizer, lr_scheduler
    )
    trained = [unet, text_encoder] if cfg.train_text_encoder else [unet]
    for module in trained:
        module.train()

    saves = set(checkpoint_steps(cfg.max_train_steps, cfg.save_steps))
    written: list[Path] = []
    order = torch.empty(0, dtype=torch.long)
    step = micro_step = 0
    log.info("training %s: %d images, %d steps", dataset, len(captions), cfg.max_train_steps)
    while step < cfg.max_train_steps:
        if len(order) < cfg.train_batch_size:  # new epoch: reshuffle
            order = torch.cat([order, torch.randperm(len(captions), generator=rng)])
        batch, order = order[: cfg.train_batch_size], order[cfg.train_batch_size :]
        with accelerator.accumulate(*trained):
            eps = torch.randn(latent_mean[batch].shape, generator=rng)
            latents = (latent_mean[batch] + latent_std[batch] * eps) * scaling
            noise = torch.randn(latents.shape, generator=rng)
            if cfg.noise_offset:
                noise += cfg.noise_offset * torch.randn(
                    (len(batch), latents.shape[1], 1, 1), generator=rng
                )
            timesteps = torch.randint(
                0, noise_scheduler.config.num_train_timesteps, (len(batch),), generator=rng
            )
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            if prompt_embeds is None:
                hidden = encode_prompts(tokenizer, text_encoder, [captions[i] for i in batch])
            else:
                hidden = prompt_embeds[batch]
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(latents, noise, timesteps)
            else:
                target = noise
            pred = unet(noisy.to(device, unet.dtype), timesteps.to(device), hidden).sample
            loss = F.mse_loss(pred.float(), target.to(device).float(), reduction="mean")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                params = [p for m in trained for p in m.parameters() if p.requires_grad]
                accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        if not math.isfinite(loss.item()):
            raise LoramillError(f"train {dataset}: loss became {loss.item()} at step {step}")
        accelerator.log({"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}, step=step)
        if step in saves:
            path = checkpoints_dir / f"step-{step:06d}.safetensors"
            metadata = {
                "loramill.step": str(step),
                "loramill.provenance": json.dumps(record, sort_keys=True),
            }
            save_checkpoint(
                path,
                accelerator.unwrap_model(unet),
                accelerator.unwrap_model(text_encoder) if cfg.train_text_encoder else None,
                metadata,
            )
            written.append(path)
            log.info("step %d: loss %.5f, wrote %s", step, loss.item(), path.name)
    accelerator.end_training()
    return written
