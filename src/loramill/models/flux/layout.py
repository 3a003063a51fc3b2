"""The two layouts of a Flux.1 (or Chroma) transformer's LoRA modules, and how they map.

Black Forest Labs' own layout (the one kohya sd-scripts trains on, ``networks/lora_flux.py``,
and that ComfyUI and Forge load natively) fuses projections that diffusers keeps apart: a
double block's ``img_attn.qkv`` is diffusers' ``attn.to_q``, ``to_k`` and ``to_v`` stacked by
output rows, and a single block's ``linear1`` is ``attn.to_q``, ``to_k``, ``to_v`` and
``proj_mlp`` stacked. Every BFL module here is listed with the diffusers modules whose output
rows it stacks, in order (as diffusers' single-file converter splits a BFL checkpoint).

kohya's LoRA targets every Linear inside the double and single blocks: 10 per double block and
3 per single block (19 × 10 + 38 × 3 = 304 for Flux.1 dev and schnell). Chroma's blocks have
no modulation Linears (an approximator outside the blocks makes their modulation), so it has
8 and 2 (228). The rest (the embedders, the final layer) is not targeted, as in kohya.
``train_blocks`` (kohya's network argument) keeps the double blocks, the single ones or both.
Free of torch: the names come from the transformer's config.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loramill import LoramillError

# (BFL module in a double block, the diffusers modules it stacks, a modulation?), in kohya's order
DOUBLE = (
    ("img_mod.lin", ("norm1.linear",), True),
    ("img_attn.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), False),
    ("img_attn.proj", ("attn.to_out.0",), False),
    ("img_mlp.0", ("ff.net.0.proj",), False),
    ("img_mlp.2", ("ff.net.2",), False),
    ("txt_mod.lin", ("norm1_context.linear",), True),
    ("txt_attn.qkv", ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), False),
    ("txt_attn.proj", ("attn.to_add_out",), False),
    ("txt_mlp.0", ("ff_context.net.0.proj",), False),
    ("txt_mlp.2", ("ff_context.net.2",), False),
)
SINGLE = (
    ("linear1", ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), False),
    ("linear2", ("proj_out",), False),
    ("modulation.lin", ("norm.linear",), True),
)
TRAIN_BLOCKS = ("all", "double", "single")
KOHYA_PREFIX = "lora_unet_"  # kohya's LORA_PREFIX_FLUX, "make ComfyUI compatible"


def is_chroma(config: Mapping[str, Any]) -> bool:
    """Chroma's transformer (diffusers' ChromaTransformer2DModel) has an approximator."""
    return "approximator_num_channels" in config


def bfl_modules(config: Mapping[str, Any], train_blocks: str = "all") -> dict[str, tuple[str, ...]]:
    """Every targeted BFL module (``double_blocks.0.img_attn.qkv``) → the diffusers modules
    (``transformer_blocks.0.attn.to_q`` …) it stacks by output rows, in kohya's order."""
    if train_blocks not in TRAIN_BLOCKS:
        raise LoramillError(f"train_blocks '{train_blocks}': use {' | '.join(TRAIN_BLOCKS)}")
    chroma = is_chroma(config)
    kinds = []
    if train_blocks in ("all", "double"):
        kinds.append(("double_blocks", "transformer_blocks", config["num_layers"], DOUBLE))
    if train_blocks in ("all", "single"):
        kinds.append(
            ("single_blocks", "single_transformer_blocks", config["num_single_layers"], SINGLE)
        )
    modules = {}
    for bfl_root, diffusers_root, count, layout in kinds:
        for index in range(count):
            for bfl, parts, modulation in layout:
                if modulation and chroma:
                    continue
                inside = tuple(f"{diffusers_root}.{index}.{part}" for part in parts)
                modules[f"{bfl_root}.{index}.{bfl}"] = inside
    return modules


def peft_targets(config: Mapping[str, Any], train_blocks: str = "all") -> list[str]:
    """The diffusers modules a LoRA on kohya's targets covers (full names: a suffix such as
    ``proj_out`` would also catch the final layer, which kohya leaves alone)."""
    return [name for parts in bfl_modules(config, train_blocks).values() for name in parts]


def kohya_name(bfl: str) -> str:
    """kohya's key stem of a BFL module: ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return KOHYA_PREFIX + bfl.replace(".", "_")


def row_slices(sizes: Mapping[str, int], parts: tuple[str, ...]) -> dict[str, slice]:
    """Where each diffusers module's output rows sit in the fused BFL weight, from the
    modules' output sizes."""
    slices, start = {}, 0
    for part in parts:
        slices[part] = slice(start, start + sizes[part])
        start += sizes[part]
    return slices
