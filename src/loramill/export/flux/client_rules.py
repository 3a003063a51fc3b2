"""How ComfyUI (and Forge, whose Flux LoRA loader is ComfyUI's) loads a Flux LoRA, written from
its loader, for the export's checks (loramill.export.client_rules has the loading itself).

ComfyUI's key map of a Flux model (``comfy/lora.py`` ``model_lora_keys_unet``, with
``comfy/utils.py`` ``flux_to_diffusers`` for the diffusers spellings) sends a LoRA key to a weight
of its BFL-layout model:

- kohya's ``lora_unet_`` + the BFL module name with dots as underscores → that module's weight
  (ComfyUI derives these from its own state dict, so every BFL module has one);
- diffusers' ``transformer.`` + a diffusers module name → the BFL weight it lives in, and for a
  part of a fused module the rows it takes there (``attn.to_k`` → the second third of
  ``img_attn.qkv``; ``proj_mlp`` → the last 12288 rows of ``linear1``).

A key in neither is "lora key not loaded". Targets are spelled ``<bfl module>`` or
``<bfl module>[start:stop]`` for a part's rows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from loramill.export.client_rules import Applied, comfyui_load
from loramill.models.flux.layout import bfl_modules, kohya_name, row_slices


def comfyui_key_map(config: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, str]:
    """ComfyUI's key map for the LoRA-trained modules of a Flux transformer with ``config``;
    ``sizes``: each diffusers module's output rows."""
    key_map = {}
    for bfl, parts in bfl_modules(config).items():
        key_map[kohya_name(bfl)] = bfl
        for part, rows in row_slices(sizes, parts).items():
            whole = len(parts) == 1
            key_map[f"transformer.{part}"] = bfl if whole else f"{bfl}[{rows.start}:{rows.stop}]"
    return key_map


def comfyui_flux_load(
    tensors: dict[str, torch.Tensor], config: Mapping[str, Any], sizes: Mapping[str, int]
) -> tuple[Applied, list[str]]:
    """What ComfyUI applies of a Flux LoRA file, and the keys it leaves unread."""
    return comfyui_load(tensors, comfyui_key_map(config, sizes))


def fused_deltas(
    applied: Applied, shapes: Mapping[str, tuple[int, int]]
) -> dict[str, torch.Tensor]:
    """The change to each BFL weight (``shapes``: the fused weights' shapes) that ``applied``
    makes, parts' rows included."""
    deltas: dict[str, torch.Tensor] = {}
    for target, (up, down, scale) in applied.items():
        module, _, rows = target.partition("[")
        delta = deltas.setdefault(module, torch.zeros(shapes[module]))
        start, stop = (int(x) for x in rows.rstrip("]").split(":")) if rows else (0, delta.shape[0])
        delta[start:stop] += scale * (up.float() @ down.float())
    return deltas
