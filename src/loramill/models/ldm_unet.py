"""The UNet's original (CompVis / LDM) layout, generated from its diffusers config: which LDM
module each diffusers module is (SD 1.x/2.x and SDXL: a transformer depth per level,
``label_emb`` for SDXL's added conditions). kohya names SDXL's LoRA modules by it
(loramill.models.kohya_names); AUTOMATIC1111 and ComfyUI apply LoRAs to it
(loramill.export.ldm_names).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TRANSFORMER_BLOCK_PARTS = (
    "norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
    *(f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
)  # fmt: skip


def _resnet(ldm: str, diffusers: str, shortcut: bool) -> Iterator[tuple[str, str]]:
    for part, ldm_part in RESNET_PARTS.items():
        if part != "conv_shortcut" or shortcut:
            yield f"{ldm}.{ldm_part}", f"{diffusers}.{part}"


def _transformer(ldm: str, diffusers: str, depth: int) -> Iterator[tuple[str, str]]:
    for part in ("norm", "proj_in", "proj_out"):
        yield f"{ldm}.{part}", f"{diffusers}.{part}"
    for block in range(depth):
        for part in TRANSFORMER_BLOCK_PARTS:
            name = f"transformer_blocks.{block}.{part}"
            yield f"{ldm}.{name}", f"{diffusers}.{name}"


def _per_level(value: Any, levels: int) -> list[Any]:
    """A config value given once for every level or as one entry per level."""
    return list(value) if isinstance(value, list | tuple) else [value] * levels


def _depth(level: Any, layer: int) -> int:
    """Transformer blocks of one attention: a level's depth, or its per-layer list's entry."""
    return int(level[layer] if isinstance(level, list | tuple) else level)


def _levels(config: Any) -> dict[str, list[Any]]:
    """The UNet's per-level layout, as diffusers' UNet2DConditionModel builds it: ResNets
    per level (each up level has one more), attention or not, transformer depth (the up
    levels take the down levels' depths reversed unless the config gives their own)."""
    levels = len(config["block_out_channels"])
    per_block = _per_level(config["layers_per_block"], levels)
    # SD1.x/2.x configs written before SDXL have no transformer_layers_per_block: depth 1
    depth = _per_level(config.get("transformer_layers_per_block") or 1, levels)
    up_depth = config.get("reverse_transformer_layers_per_block") or depth[::-1]
    return {
        "channels": list(config["block_out_channels"]),
        "down": per_block,
        "up": [n + 1 for n in per_block[::-1]],
        "down_attention": [t.startswith("CrossAttn") for t in config["down_block_types"]],
        "up_attention": [t.startswith("CrossAttn") for t in config["up_block_types"]],
        "down_depth": depth,
        "up_depth": list(up_depth),
        "mid_depth": [_depth(depth[-1], 0)],  # the mid block has one attention
    }


def _input_blocks(layout: dict[str, list[Any]]) -> Iterator[tuple[str, str]]:
    index, out_channels = 0, layout["channels"][0]
    for i, width in enumerate(layout["channels"]):
        for j in range(layout["down"][i]):
            index += 1
            ldm, diffusers = f"input_blocks.{index}", f"down_blocks.{i}"
            yield from _resnet(f"{ldm}.0", f"{diffusers}.resnets.{j}", out_channels != width)
            out_channels = width
            if layout["down_attention"][i]:
                depth = _depth(layout["down_depth"][i], j)
                yield from _transformer(f"{ldm}.1", f"{diffusers}.attentions.{j}", depth)
        if i < len(layout["channels"]) - 1:
            index += 1
            yield f"input_blocks.{index}.0.op", f"down_blocks.{i}.downsamplers.0.conv"


def _output_blocks(layout: dict[str, list[Any]]) -> Iterator[tuple[str, str]]:
    index = 0
    for i, count in enumerate(layout["up"]):
        attention = layout["up_attention"][i]
        for j in range(count):
            ldm, diffusers = f"output_blocks.{index}", f"up_blocks.{i}"
            # every output ResBlock takes the skip connection's channels too: a 1×1 shortcut
            yield from _resnet(f"{ldm}.0", f"{diffusers}.resnets.{j}", True)
            if attention:
                depth = _depth(layout["up_depth"][i], j)
                yield from _transformer(f"{ldm}.1", f"{diffusers}.attentions.{j}", depth)
            index += 1
        if i < len(layout["up"]) - 1:
            # the upsampler follows the level's last block, after its attention if it has one
            position = 2 if attention else 1
            yield f"output_blocks.{index - 1}.{position}.conv", f"up_blocks.{i}.upsamplers.0.conv"


def unet_pairs(config: Any) -> dict[str, str]:
    """LDM module path → diffusers module path for every weighted module of a UNet with this
    diffusers config: SD1.x/2.x and SDXL (per-level transformer depth, the size and crop
    embedding ``label_emb``), the layout kohya's SDXL UNet has and diffusers converts from."""
    layout = _levels(config)
    pairs = {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    pairs |= {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
    if config.get("addition_embed_type") == "text_time":  # SDXL's pooled text and size numbers
        pairs |= {
            "label_emb.0.0": "add_embedding.linear_1",
            "label_emb.0.2": "add_embedding.linear_2",
        }
    pairs |= _input_blocks(layout)
    pairs |= _resnet("middle_block.0", "mid_block.resnets.0", False)
    pairs |= _transformer("middle_block.1", "mid_block.attentions.0", layout["mid_depth"][0])
    pairs |= _resnet("middle_block.2", "mid_block.resnets.1", False)
    pairs |= _output_blocks(layout)
    return pairs
