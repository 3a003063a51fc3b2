"""Flux.1's and Chroma's LoRA modules in both layouts (issue #30): kohya's targets counted on the
full-size transformers (meta device, no weights), and the BFL ↔ diffusers map checked against
diffusers' own single-file converter of a BFL checkpoint."""

from __future__ import annotations

import re

import pytest
import torch
from accelerate import init_empty_weights
from conftest import linears

from loramill import LoramillError
from loramill.demo.full_size import CHROMA, FLUX_DEV, FLUX_SCHNELL
from loramill.models.flux.layout import (
    bfl_modules,
    is_chroma,
    kohya_name,
    peft_targets,
    row_slices,
)


def full_size(config: dict) -> torch.nn.Module:
    from diffusers import ChromaTransformer2DModel, FluxTransformer2DModel

    kind = ChromaTransformer2DModel if is_chroma(config) else FluxTransformer2DModel
    with init_empty_weights():
        return kind(**config)


@pytest.mark.parametrize(
    ("config", "parameters", "kohya", "peft"),
    [
        (FLUX_DEV, 11_901_408_320, 304, 494),
        (FLUX_SCHNELL, 11_891_178_560, 304, 494),
        (CHROMA, 8_899_983_424, 228, 418),
    ],
    ids=["flux-dev", "flux-schnell", "chroma"],
)
def test_full_size_kohya_targets(config, parameters, kohya, peft):
    model = full_size(config)
    assert sum(p.numel() for p in model.parameters()) == parameters
    modules, found = bfl_modules(model.config), linears(model)
    # kohya: every Linear of the 19 double and 38 single blocks (10 and 3; Chroma 8 and 2)
    assert len(modules) == kohya
    assert len(peft_targets(model.config)) == peft and set(peft_targets(model.config)) <= set(found)
    for bfl, parts in modules.items():
        # the parts of one fused module read the same input
        assert len({found[part].in_features for part in parts}) == 1, bfl
    # nothing outside the blocks: the embedders and the final layer stay as they are
    outside = {n for n in found if not n.startswith(("transformer_blocks.", "single_transformer"))}
    assert outside and not outside & set(peft_targets(model.config))
    sizes = {bfl: sum(found[p].out_features for p in parts) for bfl, parts in modules.items()}
    if kohya == 304:  # BFL's fused widths (flux/model.py): qkv 3 × 3072, linear1 3 × 3072 + 12288
        assert sizes["double_blocks.0.img_attn.qkv"] == 9216
        assert sizes["single_blocks.37.linear1"] == 21504
        assert sizes["double_blocks.18.txt_mod.lin"] == 6 * 3072
        qkv = kohya_name("double_blocks.0.img_attn.qkv")
        assert qkv == "lora_unet_double_blocks_0_img_attn_qkv"


def test_train_blocks_keeps_the_double_or_the_single_blocks():
    double = bfl_modules(FLUX_DEV, "double")
    single = bfl_modules(FLUX_DEV, "single")
    assert len(double) == 190 and len(single) == 114
    assert {**double, **single} == bfl_modules(FLUX_DEV)
    refused = re.escape("train_blocks 'odd': use all | double | single")
    with pytest.raises(LoramillError, match=refused):
        bfl_modules(FLUX_DEV, "odd")


# BFL keys outside kohya's targets, for a complete checkpoint the converter accepts
OUTSIDE = ("time_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "vector_in.out_layer",
           "guidance_in.in_layer", "guidance_in.out_layer", "txt_in", "img_in",
           "final_layer.linear", "final_layer.adaLN_modulation.1")  # fmt: skip
NORMS = {"double_blocks": ("img_attn.norm.query_norm", "img_attn.norm.key_norm",
                           "txt_attn.norm.query_norm", "txt_attn.norm.key_norm"),
         "single_blocks": ("norm.query_norm", "norm.key_norm")}  # fmt: skip


def test_the_map_agrees_with_diffusers_single_file_converter():
    """A full-size BFL checkpoint whose every row holds its own number (one column: the
    converter splits rows only), through diffusers' converter: each diffusers module must
    receive the rows the map says, weights and biases."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    model = full_size(FLUX_DEV)
    found, modules = linears(model), bfl_modules(model.config)
    sizes = {bfl: sum(found[p].out_features for p in parts) for bfl, parts in modules.items()}
    start = [0]

    def numbered(rows: int) -> torch.Tensor:  # one column of consecutive numbers
        start[0] += rows
        return torch.arange(start[0] - rows, start[0], dtype=torch.float64)[:, None]

    checkpoint = {}
    for name, rows in [*sizes.items(), *((outside, 2) for outside in OUTSIDE)]:
        checkpoint[f"{name}.weight"] = numbered(rows)
        checkpoint[f"{name}.bias"] = numbered(rows)[:, 0]
    for root, count in (("double_blocks", 19), ("single_blocks", 38)):
        for index in range(count):
            for norm in NORMS[root]:
                checkpoint[f"{root}.{index}.{norm}.scale"] = numbered(1)[:, 0]
    fused = dict(checkpoint)
    converted = convert_flux_transformer_checkpoint_to_diffusers(checkpoint)
    for bfl, parts in modules.items():
        part_sizes = {part: found[part].out_features for part in parts}
        for part, rows in row_slices(part_sizes, parts).items():
            for kind in ("weight", "bias"):
                assert torch.equal(converted[f"{part}.{kind}"], fused[f"{bfl}.{kind}"][rows]), part
    # and every diffusers module the map names came from the map's module, none is missing
    assert {k.rsplit(".", 1)[0] for k in converted} >= set(peft_targets(model.config))
