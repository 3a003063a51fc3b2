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

and its CLIP-L (``comfy/lora.py`` ``model_lora_keys_clip``, the model's ``clip_l``) takes kohya's
``lora_te1_`` / ``lora_te_`` and diffusers' ``text_encoder.text_model.`` keys, as on SDXL. A key
in none is "lora key not loaded". Targets are spelled ``<bfl module>`` or
``<bfl module>[start:stop]`` for a part's rows, ``clip_l.transformer.text_model.…`` for CLIP-L.
ComfyUI's Chroma model is a subclass of its Flux model (``comfy/model_base.py``), so Chroma's
LoRAs are read by the same rules, without the modulation modules Chroma has none of.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from loramill.export.client_rules import Applied, comfyui_clip_keys, comfyui_load
from loramill.models.flux.layout import bfl_modules, kohya_name, row_slices
from loramill.models.kohya_names import TE_ROOT

CLIP_L = "clip_l.transformer."  # where ComfyUI's Flux text model holds CLIP-L


def part_targets(config: Mapping[str, Any], sizes: Mapping[str, int]) -> dict[str, str]:
    """Where each LoRA-trained diffusers module of a Flux transformer with ``config`` lives in
    the BFL layout: its BFL module, or a fused module's rows (``sizes``: each diffusers
    module's output rows)."""
    targets = {}
    for bfl, parts in bfl_modules(config).items():
        for part, rows in row_slices(sizes, parts).items():
            targets[part] = bfl if len(parts) == 1 else f"{bfl}[{rows.start}:{rows.stop}]"
    return targets


def clip_target(module: str) -> str:
    """ComfyUI's module of a CLIP-L module (its transformers path, ``text_model.`` or not)."""
    return CLIP_L + TE_ROOT + module.removeprefix(TE_ROOT)


def comfyui_key_map(
    config: Mapping[str, Any], sizes: Mapping[str, int], clip_layers: int = 0
) -> dict[str, str]:
    """ComfyUI's key map for the LoRA-trained modules of a Flux transformer with ``config``
    (``sizes``: each diffusers module's output rows) and of a CLIP-L of ``clip_layers``."""
    key_map = {kohya_name(bfl): bfl for bfl in bfl_modules(config)}
    key_map |= {f"transformer.{part}": to for part, to in part_targets(config, sizes).items()}
    return key_map | comfyui_clip_keys(
        "text_encoder", ("lora_te_", "lora_te1_"), clip_layers,
        lambda layer, part: clip_target(f"encoder.layers.{layer}.{part}"),
    )  # fmt: skip


def comfyui_flux_load(
    tensors: dict[str, torch.Tensor],
    config: Mapping[str, Any],
    sizes: Mapping[str, int],
    clip_layers: int = 0,
) -> tuple[Applied, list[str]]:
    """What ComfyUI applies of a Flux LoRA file, and the keys it leaves unread."""
    return comfyui_load(tensors, comfyui_key_map(config, sizes, clip_layers))


def joined(applied: Applied, rows: Mapping[str, int]) -> Applied:
    """``applied`` with the parts put on a fused module's rows (``<bfl>[start:stop]``) joined
    into one pair for the whole module (``rows``: each BFL module's rows): its delta is the
    parts' deltas stacked by rows, zero on rows no part reaches, so a part that is lost or
    lands on other rows shows in the module's delta; plus the module's own pair where a file
    holds both spellings (a client applies both)."""
    out: Applied = {}
    pieces: dict[str, list[tuple[int, int, torch.Tensor, torch.Tensor]]] = {}
    for target, (up, down, scale) in applied.items():
        module, _, span = target.partition("[")
        if not span:
            out[target] = (up, down, scale)
            continue
        start, stop = (int(x) for x in span.rstrip("]").split(":"))
        pieces.setdefault(module, []).append((start, stop, scale * up.float(), down.float()))
    for module, parts in pieces.items():
        ups, downs, reached = [], [], 0
        for start, stop, up, down in sorted(parts, key=lambda part: part[0]):
            # a (rows × 0) block: rows of the module that no part reaches
            ups += [up.new_zeros(start - reached, 0), up]
            downs.append(down)
            reached = stop
        ups.append(downs[0].new_zeros(rows[module] - reached, 0))
        up, down = torch.block_diag(*ups), torch.cat(downs)
        if module in out:  # both spellings: the deltas add, as ranks side by side
            whole_up, whole_down, scale = out[module]
            up = torch.cat([scale * whole_up.float(), up], dim=1)
            down = torch.cat([whole_down.float(), down])
        out[module] = (up, down, 1.0)
    return out


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
