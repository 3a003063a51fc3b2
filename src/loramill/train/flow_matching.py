"""The flow-matching objective Flux.1 and Chroma train with (kohya's ``flux_train_network.py``
option names and semantics).

A noise level σ in (0, 1] is drawn per image; the model sees ``(1 − σ)·latents + σ·noise`` and
σ as its timestep, and learns the velocity ``noise − latents``. How σ is drawn
(``timestep_sampling``):

- ``uniform``: σ ~ U(0, 1);
- ``sigmoid``: σ = sigmoid(``sigmoid_scale`` · N(0, 1)), most draws near the middle;
- ``shift``: that sigmoid draw s moved towards noise by ``discrete_flow_shift``,
  σ = shift·s / (1 + (shift − 1)·s);
- ``flux_shift``: the same move by the image's own size, as Flux's sampler schedules it:
  μ grows linearly from 0.5 at 256 packed tokens to 1.15 at 4096 (a 1024² image),
  σ = e^μ / (e^μ + 1/s − 1);
- ``sigma`` (kohya's default): one of the 1000 levels of the flow-matching scheduler shifted by
  ``discrete_flow_shift``, picked uniformly.

``model_prediction_type`` says what the model's output is compared with the target as:
``raw`` (the velocity itself), ``additive`` (output + noisy input), or ``sigma_scaled``
(noisy input − σ · output). kohya's command line defaults to ``sigma_scaled``, which turns the
output into an estimate of the clean latents while the target stays the velocity; its Flux
guide recommends ``raw``, loramill's default.

All draws come from the run's seeded generator.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from loramill import LoramillError
from loramill.models.flux.latents import unpack
from loramill.train.objective import Noised, input_noise, loss

SAMPLINGS = ("sigma", "uniform", "sigmoid", "shift", "flux_shift")
PREDICTIONS = ("raw", "additive", "sigma_scaled")
LEVELS = 1000  # the scheduler's training timesteps (σ × 1000 is the model's timestep)
# Flux's resolution-dependent shift (diffusers' calculate_shift, kohya's get_lin_function)
BASE_TOKENS, BASE_SHIFT, MAX_TOKENS, MAX_SHIFT = 256, 0.5, 4096, 1.15


@dataclass(frozen=True)
class FlowMatching:
    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float = 3.0
    model_prediction_type: str = "raw"

    def __post_init__(self) -> None:
        for key, value, allowed in (
            ("timestep_sampling", self.timestep_sampling, SAMPLINGS),
            ("model_prediction_type", self.model_prediction_type, PREDICTIONS),
        ):
            if value not in allowed:
                raise LoramillError(f"train.{key} '{value}': use {' | '.join(allowed)}")
        if self.discrete_flow_shift <= 0:
            raise LoramillError(
                f"train.discrete_flow_shift {self.discrete_flow_shift}: it must be above 0"
            )


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ moved towards noise by ``shift`` (1: unchanged)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def flux_mu(tokens: int) -> float:
    """μ of Flux's shift for an image of ``tokens`` packed latent tokens."""
    slope = (MAX_SHIFT - BASE_SHIFT) / (MAX_TOKENS - BASE_TOKENS)
    return BASE_SHIFT + slope * (tokens - BASE_TOKENS)


def scheduler_sigmas(shift: float) -> torch.Tensor:
    """The flow-matching scheduler's 1000 training levels, from pure noise down, shifted."""
    levels = torch.linspace(1, LEVELS, LEVELS, dtype=torch.float64).flip(0) / LEVELS
    return shifted(levels, shift).float()


def sample_sigmas(how: FlowMatching, batch: int, tokens: int, rng: torch.Generator) -> torch.Tensor:
    """One σ per image of a batch whose images are ``tokens`` packed tokens each."""
    mode = how.timestep_sampling
    if mode == "uniform":
        return torch.rand(batch, generator=rng)
    if mode == "sigma":
        picks = (torch.rand(batch, generator=rng) * LEVELS).long()
        return scheduler_sigmas(how.discrete_flow_shift)[picks]
    drawn = torch.sigmoid(how.sigmoid_scale * torch.randn(batch, generator=rng))
    if mode == "shift":
        return shifted(drawn, how.discrete_flow_shift)
    if mode == "flux_shift":
        growth = math.exp(flux_mu(tokens))
        return growth / (growth + (1 / drawn - 1))
    return drawn


def per_image(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noisy_latents(latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the model sees at noise level σ."""
    level = per_image(sigma, latents)
    return (1 - level) * latents + level * noise


def velocity(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The target: the direction from the clean latents to the noise."""
    return noise - latents


def as_prediction(
    how: FlowMatching, output: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor
) -> torch.Tensor:
    """The model's output as ``model_prediction_type`` compares it with the target."""
    if how.model_prediction_type == "additive":
        return output + noisy
    if how.model_prediction_type == "sigma_scaled":
        return noisy - per_image(sigma, output) * output
    return output


class FlowObjective:
    """Flux's objective: σ drawn as ``timestep_sampling`` says, the noisy latents packed into
    tokens for the transformer, its output unpacked and compared with the velocity as
    ``model_prediction_type`` says (the loss as the UNet families': ``loss_type``, unweighted
    as kohya's default weighting). ``ip_noise_gamma`` perturbs the noise added, as there."""

    def __init__(self, cfg: Any, family: Any) -> None:
        self.cfg, self.family = cfg, family
        self.how = FlowMatching(
            cfg.timestep_sampling,
            cfg.sigmoid_scale,
            cfg.discrete_flow_shift,
            cfg.model_prediction_type,
        )

    def noised(self, latents: torch.Tensor, rng: torch.Generator) -> Noised:
        noise = torch.randn(latents.shape, generator=rng)
        height, width = latents.shape[-2:]
        sigma = sample_sigmas(self.how, latents.shape[0], (height // 2) * (width // 2), rng)
        noisy = noisy_latents(latents, input_noise(noise, self.cfg, rng), sigma)
        return Noised(noisy, velocity(latents, noise), sigma)

    def predict(
        self, model: Any, noisy: torch.Tensor, level: torch.Tensor, conditioning: dict, sizes: Any
    ) -> torch.Tensor:
        inputs = self.family.denoiser_inputs(conditioning, noisy, level, self.cfg.guidance_scale)
        output = unpack(model(**inputs).sample, *noisy.shape[-2:])
        return as_prediction(self.how, output, noisy, level)

    def loss(
        self, pred: torch.Tensor, target: torch.Tensor, level: torch.Tensor, mask: Any = None,
        weight: Any = None,
    ) -> torch.Tensor:  # fmt: skip
        return loss(pred, target, weight, self.cfg, mask)
