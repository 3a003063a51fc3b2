"""What one training step minimises: the noise it adds and how the error is weighted
(kohya's option names).

- Noise: Gaussian, plus ``noise_offset`` × a per-channel constant (darker darks, brighter
  brights), plus ``multires_noise_iterations`` levels of pyramid noise, each level drawn at
  a random fraction of the size, upsampled, weighted by ``multires_noise_discount`` to the
  level's power, the sum rescaled to unit variance. ``ip_noise_gamma`` perturbs the noise that
  is added (input perturbation) while the target keeps the unperturbed noise.
- Target: the noise, or the velocity for v-prediction bases (from the scheduler's config).
- Loss per image: ``loss_type`` l2 (squared error), huber or smooth_l1 (with ``huber_c``),
  averaged over the latent (with ``masked_loss``, each element times its image's mask
  first); then weighted by min-SNR (``min_snr_gamma``: min(SNR, γ) / SNR,
  or / (SNR + 1) for v-prediction) and, with ``scale_v_pred_loss_like_noise_pred``, by
  SNR / (SNR + 1); the batch mean is the loss.

All draws come from the run's seeded generator. With every option off the step is the plain
mean squared error on Gaussian noise.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from loramill import LoramillError


class Noised(NamedTuple):
    """A batch's noisy latents, the target the model learns and the noise level per image (a
    DDPM timestep, or Flux's σ)."""

    noisy: torch.Tensor
    target: torch.Tensor
    level: torch.Tensor


def timestep_range(cfg: Any, total: int) -> tuple[int, int]:
    """The timesteps a run draws from: ``[min_timestep, max_timestep)``, at most all."""
    high = total if cfg.max_timestep is None else cfg.max_timestep
    if high > total:
        raise LoramillError(
            f"train.max_timestep {high}: the base model's scheduler has {total} timesteps"
        )
    return cfg.min_timestep, high


class NoisePrediction:
    """The UNet families' objective (SD 1.x/2.x, SDXL): the DDPM scheduler's noise, the noise
    or the velocity as target, the UNet told the timestep and its family's conditioning."""

    def __init__(self, cfg: Any, family: Any, scheduler_config: Any) -> None:
        from diffusers import DDPMScheduler

        self.cfg, self.family = cfg, family
        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.timesteps = timestep_range(cfg, self.scheduler.config.num_train_timesteps)

    def noised(self, latents: torch.Tensor, rng: torch.Generator) -> Noised:
        cfg, scheduler = self.cfg, self.scheduler
        noise = sample_noise(latents, cfg, rng)
        timesteps = torch.randint(*self.timesteps, (latents.shape[0],), generator=rng)
        noisy = scheduler.add_noise(latents, input_noise(noise, cfg, rng), timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            return Noised(noisy, scheduler.get_velocity(latents, noise, timesteps), timesteps)
        return Noised(noisy, noise, timesteps)

    def predict(
        self, model: Any, noisy: torch.Tensor, level: torch.Tensor, conditioning: dict, sizes: Any
    ) -> torch.Tensor:
        return model(noisy, level, **self.family.unet_inputs(conditioning, sizes)).sample

    def loss(
        self, pred: torch.Tensor, target: torch.Tensor, level: torch.Tensor, mask: Any = None,
        weight: Any = None,
    ) -> torch.Tensor:  # fmt: skip
        """The batch's loss; ``level``: the rows' timesteps, on the CPU; ``mask``: per image,
        a weight per latent pixel (train.masked_loss); ``weight``: per image, a weight of its
        own (prior_loss_weight)."""
        snr_weights = weights(self.scheduler, level, self.cfg)
        return loss(pred, target, times(snr_weights, weight), self.cfg, mask)


def sample_noise(latents: torch.Tensor, cfg: Any, rng: torch.Generator) -> torch.Tensor:
    noise = torch.randn(latents.shape, generator=rng)
    if cfg.noise_offset:
        offset = torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=rng)
        noise += cfg.noise_offset * offset
    if cfg.multires_noise_iterations:
        noise = _pyramid(noise, cfg.multires_noise_iterations, cfg.multires_noise_discount, rng)
    return noise


def _pyramid(noise: torch.Tensor, levels: int, discount: float, rng: torch.Generator) -> Any:
    batch, channels, height, width = noise.shape
    for level in range(1, levels + 1):
        scale = float(torch.rand((), generator=rng)) * 2 + 2  # each level 2–4× smaller again
        size = (max(1, int(height / scale**level)), max(1, int(width / scale**level)))
        coarse = torch.randn((batch, channels, *size), generator=rng)
        noise = noise + discount**level * F.interpolate(coarse, (height, width), mode="bilinear")
        if size == (1, 1):
            break
    return noise / noise.std()


def input_noise(noise: torch.Tensor, cfg: Any, rng: torch.Generator) -> torch.Tensor:
    """The noise added to the latents: ``ip_noise_gamma`` perturbs it."""
    if not cfg.ip_noise_gamma:
        return noise
    return noise + cfg.ip_noise_gamma * torch.randn(noise.shape, generator=rng)


def snr(scheduler: Any, timesteps: torch.Tensor) -> torch.Tensor:
    alphas = scheduler.alphas_cumprod[timesteps]
    return alphas / (1 - alphas)


def weights(scheduler: Any, timesteps: torch.Tensor, cfg: Any) -> torch.Tensor | None:
    """Per-image loss weights, or None when every image weighs 1."""
    v_prediction = scheduler.config.prediction_type == "v_prediction"
    if not cfg.min_snr_gamma and not (v_prediction and cfg.scale_v_pred_loss_like_noise_pred):
        return None
    ratio = snr(scheduler, timesteps)
    weight = torch.ones_like(ratio)
    if cfg.min_snr_gamma:
        clipped = torch.clamp(ratio, max=cfg.min_snr_gamma)
        weight = clipped / (ratio + 1) if v_prediction else clipped / ratio
    if v_prediction and cfg.scale_v_pred_loss_like_noise_pred:
        weight = weight * ratio / (ratio + 1)
    return weight


def times(weight: Any, other: Any) -> Any:
    """Two per-image weights multiplied; None stands for all ones."""
    if weight is None or other is None:
        return other if weight is None else weight
    return weight * other.to(weight.device)


def loss(
    pred: torch.Tensor, target: torch.Tensor, weight: Any, cfg: Any, mask: Any = None
) -> torch.Tensor:
    """The batch's mean loss: per element, times ``mask`` (B × 1 × h × w, as kohya's masked
    loss: the average over the latent keeps the masked-out elements' zeros), averaged per
    image, times the image's ``weight``."""
    pred, target = pred.float(), target.float()
    if cfg.loss_type == "l2" and weight is None and mask is None:
        return F.mse_loss(pred, target, reduction="mean")  # the plain case, as it always was
    if cfg.loss_type == "l2":
        error = F.mse_loss(pred, target, reduction="none")
    elif cfg.loss_type == "huber":
        error = F.huber_loss(pred, target, reduction="none", delta=cfg.huber_c)
    else:
        error = F.smooth_l1_loss(pred, target, reduction="none", beta=cfg.huber_c)
    if mask is not None:
        error = error * mask.to(error.device, error.dtype)
    per_image = error.mean(dim=tuple(range(1, error.dim())))
    if weight is not None:
        per_image = per_image * weight.to(per_image.device)
    return per_image.mean()
