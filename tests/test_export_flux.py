"""A Flux LoRA in kohya's BFL layout (issue #30): fused projections carry exactly their parts'
adapters, diffusers reads the file back into those parts, and applied to the fused (BFL-layout)
weights it gives the model the diffusers-layout adapter gives."""

from __future__ import annotations

import copy

import pytest
import torch
from accelerate import init_empty_weights
from conftest import linears, random_lora_pairs

from loramill import LoramillError
from loramill.demo.full_size import FLUX_DEV
from loramill.demo.tiny_flux import TINY_FLUX
from loramill.export.flux.kohya import to_bfl_kohya
from loramill.models.flux.latents import image_ids
from loramill.models.flux.layout import bfl_modules, kohya_name, peft_targets, row_slices

RANK, ALPHA = 4, 8.0


def test_diffusers_reads_the_bfl_file_back_into_each_part():
    """Full width (diffusers' kohya converter splits single blocks at 3072), one block of each
    kind: every part's delta comes back as trained, at the trained scale."""
    from diffusers import FluxPipeline

    config = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1}
    with init_empty_weights():
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(**config)
    pairs = random_lora_pairs(model, peft_targets(config), RANK)
    kohya = to_bfl_kohya(pairs, dict.fromkeys(pairs, ALPHA), config)
    assert len(kohya) == 3 * 13  # 10 + 3 modules: down, up, alpha each
    fused = kohya_name("double_blocks.0.img_attn.qkv")
    assert kohya[f"{fused}.lora_down.weight"].shape == (3 * RANK, 3072)
    assert kohya[f"{fused}.alpha"] == 3 * ALPHA  # alpha / rank stays the trained 8 / 4
    assert kohya[f"{kohya_name('single_blocks.0.linear1')}.alpha"] == 4 * ALPHA
    assert kohya[f"{kohya_name('single_blocks.0.linear2')}.alpha"] == ALPHA
    theirs = FluxPipeline.lora_state_dict(dict(kohya))
    assert len(theirs) == 2 * len(pairs)
    probe = torch.randn(15360, 8, generator=torch.Generator().manual_seed(2))  # B·A·probe, not B·A
    for name, pair in pairs.items():
        a, b = (theirs[f"transformer.{name}.lora_{x}.weight"] for x in "AB")
        ours = ALPHA / RANK * pair["B"] @ (pair["A"] @ probe[: a.shape[1]])
        assert torch.allclose(b @ (a @ probe[: a.shape[1]]), ours, rtol=1e-5, atol=1e-5), name


def test_the_fused_file_on_bfl_weights_gives_the_diffusers_adapters_model():
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    base = FluxTransformer2DModel(**TINY_FLUX["transformer"], guidance_embeds=True)
    config = dict(base.config)
    adapted = copy.deepcopy(base)
    targets = peft_targets(config)
    adapted.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=targets))
    pairs, rng = {}, torch.Generator().manual_seed(1)
    for name in targets:
        layer = adapted.get_submodule(name)
        torch.nn.init.normal_(layer.lora_B["default"].weight, generator=rng)  # not the zero init
        pairs[name] = {"A": layer.lora_A["default"].weight, "B": layer.lora_B["default"].weight}
    kohya = to_bfl_kohya(pairs, dict.fromkeys(pairs, ALPHA), config)
    # the BFL-layout model: each fused weight patched as kohya, ComfyUI and Forge patch it,
    # then read back into diffusers' modules by its rows
    patched, found = copy.deepcopy(base), linears(base)
    with torch.no_grad():
        for bfl, parts in bfl_modules(config).items():
            name = kohya_name(bfl)
            down, up = kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"]
            scale = kohya[f"{name}.alpha"] / down.shape[0]
            weight = torch.cat([found[part].weight for part in parts]) + scale * up @ down
            sizes = {part: found[part].out_features for part in parts}
            for part, rows in row_slices(sizes, parts).items():
                patched.get_submodule(part).weight.copy_(weight[rows])
    rng = torch.Generator().manual_seed(2)
    inputs = {
        "hidden_states": torch.randn(1, 16, 64, generator=rng),
        "encoder_hidden_states": torch.randn(1, 6, 32, generator=rng),
        "pooled_projections": torch.randn(1, 32, generator=rng),
        "timestep": torch.tensor([0.4]), "guidance": torch.tensor([1.0]),
        "txt_ids": torch.zeros(6, 3), "img_ids": image_ids(8, 8),
    }  # fmt: skip
    with torch.no_grad():
        ours, theirs, plain = (m(**inputs).sample for m in (adapted, patched, base))
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter does change the output


def test_a_module_kohya_cannot_name_or_a_missing_part_is_refused():
    config = {**FLUX_DEV, "num_layers": 1, "num_single_layers": 1}
    pair = {"A": torch.zeros(RANK, 8), "B": torch.zeros(8, RANK)}
    parts = bfl_modules(config)["double_blocks.0.img_attn.qkv"]
    with pytest.raises(LoramillError, match=r"no LoRA on transformer_blocks\.0\.attn\.to_v"):
        to_bfl_kohya({p: pair for p in parts[:2]}, dict.fromkeys(parts, ALPHA), config)
    with pytest.raises(LoramillError, match="'proj_out' has no name in kohya's layout"):
        to_bfl_kohya({"proj_out": pair}, {"proj_out": ALPHA}, config)
