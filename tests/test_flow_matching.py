"""Flux's training objective (issue #30): kohya's timestep_sampling modes, the noisy input, the
velocity target and model_prediction_type; the packed latents and their positions, checked
against diffusers' FluxPipeline and scheduler."""

from __future__ import annotations

import math

import pytest
import torch

from loramill import LoramillError
from loramill.models.flux.latents import image_ids, pack, unpack
from loramill.train.flow_matching import (
    FlowMatching,
    as_prediction,
    flux_mu,
    noisy_latents,
    sample_sigmas,
    scheduler_sigmas,
    velocity,
)


def draws(seed: int = 0, batch: int = 4096, tokens: int = 4096, **options) -> torch.Tensor:
    rng = torch.Generator().manual_seed(seed)
    return sample_sigmas(FlowMatching(**options), batch, tokens, rng)


def test_every_mode_draws_levels_in_range_and_from_the_seed_alone():
    for mode in ("sigma", "uniform", "sigmoid", "shift", "flux_shift"):
        sigma = draws(timestep_sampling=mode)
        assert sigma.shape == (4096,) and sigma.min() > 0 and sigma.max() <= 1, mode
        assert torch.equal(sigma, draws(timestep_sampling=mode)), mode
        assert not torch.equal(sigma, draws(1, timestep_sampling=mode)), mode


def test_shifts_move_levels_towards_noise_as_kohya_does():
    sigmoid = draws(timestep_sampling="sigmoid")
    # shift 1 is no shift; shift 3 maps the sigmoid draw s to 3s / (1 + 2s)
    assert torch.allclose(draws(timestep_sampling="shift", discrete_flow_shift=1.0), sigmoid)
    three = draws(timestep_sampling="shift", discrete_flow_shift=3.0)
    assert torch.allclose(three, 3 * sigmoid / (1 + 2 * sigmoid))
    # flux_shift: μ from the packed token count, 0.5 at 256 tokens and 1.15 at 4096 (1024²)
    assert flux_mu(256) == pytest.approx(0.5) and flux_mu(4096) == pytest.approx(1.15)
    large = draws(timestep_sampling="flux_shift", tokens=4096)
    assert torch.allclose(large, math.exp(1.15) / (math.exp(1.15) + 1 / sigmoid - 1))
    small = draws(timestep_sampling="flux_shift", tokens=256)
    assert (small < large).all() and sigmoid.median() < small.median()


def test_sigma_mode_picks_the_shifted_scheduler_levels():
    from diffusers import FlowMatchEulerDiscreteScheduler

    theirs = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).sigmas[:1000]
    assert torch.allclose(scheduler_sigmas(3.0), theirs.float())
    sigma = draws(timestep_sampling="sigma", discrete_flow_shift=3.0)
    assert torch.isin(sigma, scheduler_sigmas(3.0)).all()
    assert sigma.median() == pytest.approx(0.75, abs=0.02)  # shift 3 moves the median 0.5 there


def test_noisy_input_target_and_prediction_types():
    latents, noise = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    sigma = torch.tensor([0.0, 1.0])
    noisy = noisy_latents(latents, noise, sigma)
    assert torch.equal(noisy[0], latents[0]) and torch.equal(noisy[1], noise[1])
    target, output = velocity(latents, noise), torch.randn(2, 16, 4, 4)
    assert torch.equal(target, noise - latents)
    assert torch.equal(as_prediction(FlowMatching(), output, noisy, sigma), output)  # raw
    additive = FlowMatching(model_prediction_type="additive")
    assert torch.equal(as_prediction(additive, output, noisy, sigma), output + noisy)
    scaled = FlowMatching(model_prediction_type="sigma_scaled")
    expected = noisy - sigma.view(-1, 1, 1, 1) * output
    assert torch.equal(as_prediction(scaled, output, noisy, sigma), expected)
    # a model predicting the velocity exactly: noisy − σ·v is the clean latents at any σ
    half = torch.tensor([0.5, 0.25])
    recovered = as_prediction(scaled, target, noisy_latents(latents, noise, half), half)
    assert torch.allclose(recovered, latents, atol=1e-6)


def test_bad_options_name_the_key():
    with pytest.raises(LoramillError, match=r"train\.timestep_sampling 'logit'"):
        FlowMatching(timestep_sampling="logit")
    with pytest.raises(LoramillError, match=r"train\.model_prediction_type 'x0'"):
        FlowMatching(model_prediction_type="x0")
    with pytest.raises(LoramillError, match=r"train\.discrete_flow_shift 0"):
        FlowMatching(discrete_flow_shift=0)


def test_packing_matches_the_flux_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)  # 48 × 80 px at the VAE's 8× with 2 × 2 patches
    packed = pack(latents)
    assert packed.shape == (2, 15, 64)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(unpack(packed, 6, 10), latents)
    assert torch.equal(unpack(packed, 6, 10), FluxPipeline._unpack_latents(packed, 48, 80, 8))
    theirs = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(image_ids(6, 10), theirs)
