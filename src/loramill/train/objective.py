"""What one training step minimises: the noise it adds and how the error is weighted
(kohya's option names).

- Noise: Gaussian, plus ``noise_offset`` × a per-channel constant (darker darks, brighter
  brights), plus ``multires_noise_iterations`` levels of pyramid noise, each level drawn at
  a random fraction of the size, upsampled, weighted by ``multires_noise_discount`` to the
  level's power, the sum rescaled to unit variance. ``ip_noise_gamma`` perturbs the noise that
  is added (input perturbation) while the target keeps the unperturbed noise.
- Target: the noise, or the velocity for v-prediction bases (from the scheduler's config).
- Loss per image: ``loss_type`` l2 (squared error), huber or smooth_l1 (with ``huber_c``),
  averaged over the latent; then weighted by min-SNR (``min_snr_gamma``: min(SNR, γ) / SNR,
  or / (SNR + 1) for v-prediction) and, with ``scale_v_pred_loss_like_noise_pred``, by
  SNR / (SNR + 1); the batch mean is the loss.

All draws come from the run's seeded generator. With every option off the step is the plain
mean squared error on Gaussian noise.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F


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


def loss(pred: torch.Tensor, target: torch.Tensor, weight: Any, cfg: Any) -> torch.Tensor:
    pred, target = pred.float(), target.float()
    if cfg.loss_type == "l2" and weight is None:
        return F.mse_loss(pred, target, reduction="mean")  # the plain case, as it always was
    if cfg.loss_type == "l2":
        error = F.mse_loss(pred, target, reduction="none")
    elif cfg.loss_type == "huber":
        error = F.huber_loss(pred, target, reduction="none", delta=cfg.huber_c)
    else:
        error = F.smooth_l1_loss(pred, target, reduction="none", beta=cfg.huber_c)
    per_image = error.mean(dim=tuple(range(1, error.dim())))
    if weight is not None:
        per_image = per_image * weight.to(per_image.device)
    return per_image.mean()
