"""kohya's blocks of a UNet, for its block-wise network options (``block_dims``,
``block_alphas``, ``conv_block_dims``, ``conv_block_alphas``): one value per block, indexed as
kohya's ``networks/lora.py`` (``get_block_index``) indexes a LoRA module.

- SD 1.x/2.x, 25 blocks, counted from diffusers' names (``sd_block``): 0 (no LoRA module),
  the down blocks' resnets, attentions and downsamplers 1–11, the middle block 12, the up
  blocks' 13–24; on SD's layout (two layers a level) these are ``input_blocks.1``–``.11``,
  the middle block and ``output_blocks.0``–``.11`` of the original (LDM) layout;
- SDXL, 23 blocks, counted from the LDM names kohya gives SDXL's modules (``sdxl_block``,
  loramill.models.ldm_unet): 0 (the time and size embeddings), ``input_blocks.0``–``.8`` as
  1–9, ``middle_block.0``–``.2`` as 10–12, ``output_blocks.0``–``.8`` as 13–21, ``out`` 22.

Free of torch: the workflow checks the lists' lengths when it parses.
"""

from __future__ import annotations

import math
import re
from typing import Any

from loramill import LoramillError

BLOCK_OPTIONS = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
# kohya's block learning-rate weights: the down (input) blocks', the middle's, the up
# (output) blocks', and the weight at or under which a block is not trained
LR_OPTIONS = ("down_lr_weight", "mid_lr_weight", "up_lr_weight")
BLOCK_LR_OPTIONS = (*LR_OPTIONS, "block_lr_zero_threshold")
SD_BLOCKS, SDXL_BLOCKS = 25, 23
# kohya's presets of down_lr_weight / up_lr_weight, i counting the side's blocks from 0 to n - 1
PRESETS = {
    "cosine": lambda i, n: math.sin(math.pi * ((n - 1 - i) / (n - 1)) / 2),
    "sine": lambda i, n: math.sin(math.pi * (i / (n - 1)) / 2),
    "linear": lambda i, n: i / (n - 1),
    "reverse_linear": lambda i, n: (n - 1 - i) / (n - 1),
    "zeros": lambda i, n: 0.0,
}


def block_count(sdxl: bool) -> int:
    return SDXL_BLOCKS if sdxl else SD_BLOCKS


def sd_block(module: str) -> int:
    """kohya's block of an SD 1.x/2.x UNet module, from its diffusers name as kohya computes
    it (``down_blocks.1.attentions.0.proj_in`` → 4): the level's resnets and attentions j at
    3i + j, its down- or upsampler at 3i + 2, after block 0 going down, after the middle
    block (12) going up."""
    found = re.match(
        r"(up|down)_blocks\.(\d+)\.(resnets|attentions|upsamplers|downsamplers)\.(\d+)\.", module
    )
    if found:
        way, level, kind, index = found.groups()
        within = 3 * int(level) + (2 if kind.endswith("samplers") else int(index))
        block = 1 + within if way == "down" else SD_BLOCKS // 2 + 1 + within
        if block < SD_BLOCKS:
            return block
    elif module.startswith("mid_block."):
        return SD_BLOCKS // 2
    raise LoramillError(
        f"UNet module '{module}': in none of kohya's {SD_BLOCKS} blocks (its indexing is for "
        "SD's UNet, two layers a level)"
    )


def sdxl_block(ldm_module: str) -> int:
    """kohya's block of an SDXL UNet module, from its LDM path as kohya names SDXL's modules
    (``input_blocks.4.1.proj_in`` → 5)."""
    kind, _, rest = ldm_module.partition(".")
    number = int(rest.split(".", 1)[0]) if rest[:1].isdigit() else 0
    first = {"time_embed": 0, "label_emb": 0, "input_blocks": 1, "middle_block": 10,
             "output_blocks": 13, "out": 22}  # fmt: skip
    if kind not in first:
        raise LoramillError(f"UNet module '{ldm_module}': in none of kohya's blocks")
    return first[kind] + (number if kind.endswith(("blocks", "block")) else 0)


def check_block_lists(train: Any, sdxl: bool) -> None:
    """Each block list set has one value per kohya block of the family's UNet, and means
    something for the network (each error names the key)."""
    count = block_count(sdxl)
    for key in BLOCK_OPTIONS:
        values = getattr(train, key)
        if values is not None and len(values) != count:
            family = "SDXL" if sdxl else "Stable Diffusion 1.x/2.x"
            raise LoramillError(
                f"train.{key}: {len(values)} values; {family} has {count} blocks in kohya's "
                "indexing, give one value each"
            )
    if train.conv_block_alphas is not None and train.conv_block_dims is None:
        raise LoramillError(
            "train.conv_block_alphas: set conv_block_dims too (kohya ignores the alphas without "
            "them)"
        )
    if train.conv_block_dims is not None and train.network_target != "kohya_conv":
        raise LoramillError(
            f"train.conv_block_dims: the 3×3 convs are trained by network_target kohya_conv, "
            f"not {train.network_target}"
        )
    block_lr_weights(train, sdxl)  # the lr weights' lengths and presets
    if train.block_dims is not None and not any(train.block_dims):
        raise LoramillError("train.block_dims: every block is 0, so nothing would train")


# How many weights each of kohya's lr-weight options takes (its NUM_OF_BLOCKS and
# NUM_OF_MID_BLOCKS, SDXL's own), by whether the UNet is SDXL's
WEIGHT_COUNTS = {
    False: {"down_lr_weight": 12, "mid_lr_weight": 1, "up_lr_weight": 12},
    True: {"down_lr_weight": 9, "mid_lr_weight": 3, "up_lr_weight": 9},
}


def _weights(key: str, value: Any, count: int) -> list[float]:
    """An lr-weight option's weights: a list of ``count``, or a preset name (down and up
    only) with an optional ``+base`` added to each (``cosine+0.5``)."""
    if value is None:
        return [1.0] * count
    if isinstance(value, str):
        name, _, base = value.partition("+")
        if key == "mid_lr_weight" or name not in PRESETS:
            raise LoramillError(
                f"train.{key} '{value}': a list of {count} weights, or one of "
                f"{', '.join(PRESETS)} (optionally +<number>)"
            )
        try:
            offset = float(base or 0.0)
        except ValueError:
            raise LoramillError(f"train.{key} '{value}': '{base}' is not a number") from None
        return [PRESETS[name](i, count) + offset for i in range(count)]
    if len(value) != count:
        raise LoramillError(f"train.{key}: {len(value)} weights; give {count} (one per block)")
    return [float(weight) for weight in value]


def block_lr_weights(train: Any, sdxl: bool) -> list[float] | None:
    """kohya's learning-rate weight of each block (None: no lr-weight option set): the down
    blocks', the middle's, the up blocks' (SDXL: also 1.0 for blocks 0 and 22); a weight at
    or under ``block_lr_zero_threshold`` is 0, and such a block is not trained."""
    if all(getattr(train, key) is None for key in LR_OPTIONS):
        return None
    counts = WEIGHT_COUNTS[sdxl]
    weights = [w for key in LR_OPTIONS for w in _weights(key, getattr(train, key), counts[key])]
    weights = [w if w > train.block_lr_zero_threshold else 0.0 for w in weights]
    return [1.0, *weights, 1.0] if sdxl else weights
