"""A Flux.1 (or Chroma) LoRA trained on diffusers' transformer, in kohya's BFL layout.

loramill trains a LoRA pair on each diffusers module (``attn.to_q``, ``to_k``, ``to_v`` apart);
kohya sd-scripts, ComfyUI and Forge name modules in Black Forest Labs' layout, where those three
are one fused ``img_attn.qkv`` (loramill.models.flux.layout). A fused module's adapter is the
parts' adapters side by side: ``lora_down`` stacks the parts' ``lora_A`` (rank n·r), ``lora_up``
puts each part's ``lora_B`` on the diagonal, so every part's output rows get exactly their own
delta and nothing else. The file's rank is n·r, so its alpha is n·α: every loader scales by
alpha / rank, which stays the trained α / r (kohya's own ``split_qkv`` files keep α and load at
1/n of their strength). diffusers reads such a file back into the separate parts (its kohya
converter takes a block-diagonal ``lora_up`` apart).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from loramill import LoramillError
from loramill.models.flux.layout import bfl_modules, kohya_name

Pair = Mapping[str, torch.Tensor]  # {"A": lora_A (r, in), "B": lora_B (out, r)}


def _fused(bfl: str, parts: tuple[str, ...], pairs: Mapping[str, Pair], alphas: Any) -> tuple:
    """One BFL module's ``lora_down``, ``lora_up`` and alpha from its parts' pairs."""
    missing = [part for part in parts if part not in pairs]
    if missing:
        raise LoramillError(
            f"Flux module '{bfl}' fuses {', '.join(parts)}: no LoRA on {', '.join(missing)} "
            "(kohya's layout needs every part of a fused module)"
        )
    ranks = {pairs[part]["A"].shape[0] for part in parts}
    scales = {alphas[part] for part in parts}
    if len(ranks) != 1 or len(scales) != 1:
        raise LoramillError(f"Flux module '{bfl}': its parts' LoRA ranks or alphas differ")
    down = torch.cat([pairs[part]["A"] for part in parts])
    up = torch.block_diag(*(pairs[part]["B"] for part in parts))
    return down, up, len(parts) * scales.pop()


def to_bfl_kohya(
    pairs: Mapping[str, Pair], alphas: Mapping[str, float], config: Mapping[str, Any]
) -> dict[str, torch.Tensor]:
    """kohya's tensors (``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight`` …) of a
    transformer LoRA: ``pairs`` and ``alphas`` by diffusers module name; ``config`` the
    transformer's."""
    out: dict[str, torch.Tensor] = {}
    covered: set[str] = set()
    for bfl, parts in bfl_modules(config).items():
        if not any(part in pairs for part in parts):
            continue
        down, up, alpha = _fused(bfl, parts, pairs, alphas)
        name = kohya_name(bfl)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        # float32 whatever the weights' dtype: alphas such as 0.1 are not exact in fp16
        out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
        covered.update(parts)
    if stray := sorted(set(pairs) - covered):
        raise LoramillError(f"Flux module '{stray[0]}' has no name in kohya's layout")
    return out
