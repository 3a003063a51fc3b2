"""quantize_base (loramill.models.quantize, issue #30): the frozen Linear weights in 8 or 4
bits by bitsandbytes take a half or a quarter of bfloat16's memory, compute close to it, and a
LoRA on top trains while they stay as they are. bitsandbytes' CPU kernels, the code a GPU run
takes on CUDA."""

from __future__ import annotations

import json
import sys
from importlib import metadata

import pytest
import torch
from conftest import digest, train_logged
from test_float8 import inputs, linear_bytes, transformer

from loramill import LoramillError
from loramill.models.checkpoint import read_checkpoint
from loramill.models.flux.layout import peft_targets
from loramill.models.quantize import check_quantize_device, quantize_linears

# kind → (bytes per bfloat16 weight byte, the largest relative error of the output)
KINDS = {"int8": (1 / 2, 0.05), "nf4": (1 / 4, 0.3)}


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_weights_shrink_by_their_bits_and_compute_close_to_bfloat16(kind, bitsandbytes):
    share, bound = KINDS[kind]
    reference, stored = transformer(), transformer()
    bf16_bytes = linear_bytes(stored)
    linears = sum(type(m) is torch.nn.Linear for m in stored.modules())
    assert quantize_linears(stored, kind, torch.bfloat16) == linears
    stored.to("cpu")  # bitsandbytes quantizes on the move
    assert not any(type(m) is torch.nn.Linear for m in stored.modules())
    assert linear_bytes(stored) == bf16_bytes * share
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = stored(**inputs()).sample, reference(**inputs()).sample
    error = (ours.float() - theirs.float()).norm() / theirs.float().norm()
    assert 0 < error < bound  # a rounding of the weights: close, not equal


@pytest.mark.parametrize("kind", KINDS)
def test_a_lora_on_quantized_weights_trains_and_leaves_them_alone(kind, bitsandbytes):
    from peft import LoraConfig

    model = transformer()
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=peft_targets(model.config),
                                 init_lora_weights="gaussian"))  # fmt: skip
    quantize_linears(model, kind, torch.bfloat16)  # as the train step: LoRA first, then this
    model.to("cpu")
    lora = {n: p for n, p in model.named_parameters() if "lora_" in n}
    for parameter in lora.values():
        parameter.data = parameter.data.float()
    frozen = {
        n: p.clone() for n, p in model.named_parameters() if p.dtype in (torch.int8, torch.uint8)
    }
    assert frozen and not any(p.requires_grad for n, p in model.named_parameters() if n in frozen)
    optimizer = torch.optim.AdamW(lora.values(), lr=1e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(**inputs()).sample.float().square().mean()
    loss.backward()
    # every module's lora_B (zero at init, so lora_A's gradient is zero this first step)
    ups = [p for n, p in lora.items() if "lora_B" in n]
    assert ups and all(p.grad is not None and p.grad.abs().sum() > 0 for p in ups)
    before = {n: p.detach().clone() for n, p in lora.items()}
    optimizer.step()
    assert any(not torch.equal(p, before[n]) for n, p in lora.items())
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_a_missing_library_an_unknown_kind_or_a_device_without_kernels_is_refused(
    monkeypatch,
):
    check_quantize_device(torch.device("cpu"))
    with pytest.raises(LoramillError, match=r"^train\.quantize_base: the device 'mps' has no"):
        check_quantize_device(torch.device("mps"))
    with pytest.raises(LoramillError, match=r"^train\.quantize_base 'fp4': use int8 \| nf4$"):
        quantize_linears(transformer(), "fp4", torch.bfloat16)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed: import fails
    model = transformer()
    with pytest.raises(
        LoramillError, match=r"^train\.quantize_base: needs bitsandbytes.*\[quantize\]"
    ):
        quantize_linears(model, "nf4", torch.bfloat16)
    assert any(type(m) is torch.nn.Linear for m in model.modules())  # left as it was


def test_an_sd_run_trains_on_an_int8_unet_in_float32(
    prepared, tiny_sd, tmp_path, caplog, bitsandbytes
):
    """Any family's denoiser: the tiny SD UNet's Linears in int8, LoRA computed in float32."""
    config = {"quantize_base": "int8", "max_train_steps": 2, "save_steps": 2}
    written, lines = train_logged(prepared, tmp_path / "int8", tiny_sd, caplog, config)
    plain, _ = train_logged(
        prepared, tmp_path / "plain", tiny_sd, caplog, config | {"quantize_base": None}
    )
    assert any(line.startswith("quantize_base: ") and line.endswith(" int8") for line in lines)
    assert digest(written[-1]) != digest(plain[-1])
    # the provenance names the bitsandbytes that quantized the run, and only then
    versions = [
        json.loads(read_checkpoint(path[-1]).metadata["loramill.provenance"])["versions"]
        for path in (written, plain)
    ]
    assert versions[0]["bitsandbytes"] == metadata.version("bitsandbytes")
    assert "bitsandbytes" not in versions[1]
