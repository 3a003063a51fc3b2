"""DoRA as the clients apply it: a LoRA whose weight is split into a trained magnitude per
input column and a direction (``train.network_type: dora``).

DoRA decomposes W' = (W + s·B A) · diag(m / ‖W + s·B A‖), the norm taken per column. Which
axis: AUTOMATIC1111's Lora extension (``network.py`` ``apply_weight_decompose``) normalises
per input column only; ComfyUI (``weight_adapter/base.py`` ``weight_decompose``) reads the
axis from ``dora_scale``'s shape, and on the output axis divides by the base weight's norm
instead of the merged one. peft's DoRA (``use_dora``) keeps a magnitude per output row, which
neither applies as trained; LyCORIS trains either (``wd_on_output``). So this is LyCORIS's
input-axis DoRA: the one both clients apply exactly. It is peft's LoRA layer plus a trained
magnitude ``lora_dora_scale`` (the base weight's column norms at first, so training starts
from the base model) and a forward pre-hook that scales the layer's input by
m / ‖W + s·B A‖: W (x ⊙ c) + s·B A (x ⊙ c) = W' x. The norm is detached, as in the DoRA
paper (and peft): its gradient is dropped to save memory. The magnitude sits in the layer as
a peft adapter parameter does, so checkpoints, resume and init_from carry it like lora_A.
"""

from __future__ import annotations

from typing import Any

import torch

MAGNITUDE = "lora_dora_scale"  # the layer's parameter (a ParameterDict by adapter, as peft's)


def merged_weight(layer: Any, adapter: str = "default") -> torch.Tensor:
    """W + s·B A of a peft LoRA layer, in the base weight's shape."""
    weight = layer.get_base_layer().weight
    down, up = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    delta = up.flatten(1) @ down.flatten(1)
    return weight + layer.scaling[adapter] * delta.reshape(weight.shape).to(weight.dtype)


def column_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each input column (a conv's: over outputs and the kernel), shape (in,)."""
    return weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)


def _scale_input(layer: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """The pre-hook: the input scaled by m / ‖W + s·B A‖ per column (features last for a
    Linear, channels second for a conv); the layer unchanged when its adapter is off."""
    if layer.disable_adapters or "default" not in layer.active_adapters:
        return None
    x = args[0]
    # detached, so without a graph; in the weights' dtype, not autocast's, as the clients
    # compute it when they patch the weights
    with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
        norms = column_norms(merged_weight(layer))
    scale = (getattr(layer, MAGNITUDE)["default"] / norms).to(x.dtype)
    if isinstance(layer.get_base_layer(), torch.nn.Conv2d):  # channels second: (B, C, H, W)
        scale = scale.reshape(1, -1, 1, 1)
    return (x * scale, *args[1:])


def add_dora(model: torch.nn.Module) -> None:
    """Give every LoRA layer of ``model`` a trained magnitude and the pre-hook."""
    from peft.tuners.lora import LoraLayer

    for layer in model.modules():
        if isinstance(layer, LoraLayer) and "default" in layer.lora_A:
            weight = layer.get_base_layer().weight.detach()
            magnitude = torch.nn.Parameter(column_norms(weight.float()).to(weight.dtype))
            setattr(layer, MAGNITUDE, torch.nn.ParameterDict({"default": magnitude}))
            layer.register_forward_pre_hook(_scale_input)
