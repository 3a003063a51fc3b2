"""kohya's fp8_base (loramill.models.float8, issue #30): the frozen Linear weights in float8
take half the memory of bfloat16, compute in bfloat16 to within float8's rounding, and a LoRA
on top trains while they stay as they are."""

from __future__ import annotations

import pytest
import torch

from loramill import LoramillError
from loramill.demo.tiny_flux import TINY_FLUX
from loramill.models.float8 import FLOAT8, check_float8_device, store_float8
from loramill.models.flux.latents import image_ids
from loramill.models.flux.layout import peft_targets


def transformer() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**TINY_FLUX["transformer"], guidance_embeds=True)
    return model.requires_grad_(False).to(torch.bfloat16)


def inputs() -> dict:
    rng = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(2, 16, 64, generator=rng),
        "encoder_hidden_states": torch.randn(2, 6, 32, generator=rng),
        "pooled_projections": torch.randn(2, 32, generator=rng),
        "timestep": torch.tensor([0.3, 0.8]), "guidance": torch.tensor([1.0, 1.0]),
        "txt_ids": torch.zeros(6, 3), "img_ids": image_ids(8, 8),
    }  # fmt: skip


def linear_bytes(model: torch.nn.Module) -> int:
    return sum(
        m.weight.numel() * m.weight.element_size()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    )


def test_float8_weights_halve_the_memory_and_compute_close_to_bfloat16():
    reference, stored = transformer(), transformer()
    bf16_bytes = linear_bytes(stored)
    assert store_float8(stored) == sum(isinstance(m, torch.nn.Linear) for m in stored.modules())
    assert linear_bytes(stored) * 2 == bf16_bytes
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = stored(**inputs()).sample, reference(**inputs()).sample
    error = (ours.float() - theirs.float()).norm() / theirs.float().norm()
    assert 0 < error < 0.1  # float8 rounds the weights: close, not equal


def test_a_lora_on_float8_weights_trains_and_leaves_them_alone():
    from peft import LoraConfig

    model = transformer()
    store_float8(model)
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=peft_targets(model.config),
                                 init_lora_weights="gaussian"))  # fmt: skip
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for parameter in lora.values():
        parameter.data = parameter.data.float()
    frozen = {n: p.clone() for n, p in model.named_parameters() if p.dtype == FLOAT8}
    assert frozen and all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs()).sample.float().square().mean()
    loss.backward()
    # every module's lora_B (zero at init, so lora_A's gradient is zero this first step)
    ups = [p for n, p in lora.items() if "lora_B" in n]
    assert ups and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)
    assert all(torch.equal(p.view(torch.uint8), frozen[n].view(torch.uint8))
               for n, p in model.named_parameters() if n in frozen)  # fmt: skip


def test_a_device_without_float8_is_refused_by_name():
    check_float8_device(torch.device("cpu"))
    with pytest.raises(LoramillError, match=r"^train\.fp8_base: the device 'mps' has no float8"):
        check_float8_device(torch.device("mps"))
