"""kohya's ``fp8_base``: a frozen base model's Linear weights stored in float8 (e4m3), half the
memory of bfloat16, and computed in bfloat16.

Nothing is hand-written for the arithmetic: under ``torch.autocast(dtype=bfloat16)`` torch
casts a float8 weight to bfloat16 for each matmul (on CPU and on CUDA), so the stored weight is
the only change. It is a rounding of the weights (e4m3 keeps 3 mantissa bits), done once,
deterministically; the LoRA layers on top stay float32. Only Linear weights are stored so:
biases, norms and embeddings are small and stay as they are. A device without float8 support
is refused in one line naming it.
"""

from __future__ import annotations

import torch

from loramill import LoramillError

FLOAT8 = torch.float8_e4m3fn
DEVICES = ("cpu", "cuda")  # autocast casts float8 weights to bfloat16 there


def check_float8_device(device: torch.device) -> None:
    if device.type not in DEVICES:
        raise LoramillError(
            f"train.fp8_base: the device '{device}' has no float8 support; "
            f"use it on {' or '.join(DEVICES)}, or set fp8_base: false"
        )


def store_float8(model: torch.nn.Module) -> int:
    """Store every frozen Linear weight of ``model`` in float8; the number stored."""
    stored = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear) and not weight.requires_grad:
            module.weight.data = weight.data.to(FLOAT8)
            stored += 1
    return stored
