"""ComfyUI's (and Forge's) reading of a Flux LoRA (loramill.export.flux.client_rules, issue
#30): kohya's fused BFL keys and diffusers' split keys both land on the BFL model's weights,
each part on its own rows, at the trained strength; a key it has no name for is left unread."""

from __future__ import annotations

import torch
from conftest import linears, random_lora_pairs

from loramill.demo.tiny_flux import TINY_FLUX
from loramill.export.flux.client_rules import comfyui_flux_load, fused_deltas
from loramill.export.flux.kohya import to_bfl_kohya
from loramill.models.flux.layout import bfl_modules, peft_targets

RANK, ALPHA = 4, 8.0


def tiny() -> tuple[dict, dict, dict]:
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(**TINY_FLUX["transformer"], guidance_embeds=True)
    config = dict(model.config)
    pairs = random_lora_pairs(model, peft_targets(config), RANK)
    return config, pairs, {name: module.out_features for name, module in linears(model).items()}


def expected(config: dict, pairs: dict, sizes: dict) -> dict:
    """Each BFL weight's trained change: its parts' deltas stacked by rows."""
    return {bfl: torch.cat([ALPHA / RANK * pairs[p]["B"] @ pairs[p]["A"] for p in parts])
            for bfl, parts in bfl_modules(config).items()}  # fmt: skip


def shapes(want: dict) -> dict:
    return {bfl: tuple(delta.shape) for bfl, delta in want.items()}


def test_kohyas_fused_keys_land_whole_at_the_trained_strength():
    config, pairs, sizes = tiny()
    kohya = to_bfl_kohya(pairs, dict.fromkeys(pairs, ALPHA), config)
    applied, unread = comfyui_flux_load(kohya, config, sizes)
    want = expected(config, pairs, sizes)
    assert unread == [] and len(applied) == len(want) == 2 * 10 + 2 * 3
    got = fused_deltas(applied, shapes(want))
    assert all(torch.allclose(got[bfl], want[bfl], atol=1e-5) for bfl in want)


def test_diffusers_split_keys_land_on_their_rows_and_need_their_alpha():
    config, pairs, sizes = tiny()
    split = {}
    for name, pair in pairs.items():
        split[f"transformer.{name}.lora_A.weight"] = pair["A"]
        split[f"transformer.{name}.lora_B.weight"] = pair["B"]
    want = expected(config, pairs, sizes)
    without_alpha, unread = comfyui_flux_load(split, config, sizes)
    assert unread == [] and len(without_alpha) == len(pairs)
    # no alpha: ComfyUI scales by 1.0, not the trained 8 / 4
    unscaled = fused_deltas(without_alpha, shapes(want))["single_blocks.0.linear1"]
    assert torch.allclose(unscaled * ALPHA / RANK, want["single_blocks.0.linear1"], atol=1e-5)
    alphas = {f"transformer.{name}.alpha": torch.tensor(ALPHA) for name in pairs}
    applied, unread = comfyui_flux_load({**split, **alphas}, config, sizes)
    got = fused_deltas(applied, shapes(want))
    assert unread == [] and all(torch.allclose(got[b], want[b], atol=1e-5) for b in want)


def test_a_key_comfyui_has_no_name_for_is_left_unread():
    config, pairs, sizes = tiny()
    kohya = to_bfl_kohya(pairs, dict.fromkeys(pairs, ALPHA), config)
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    typo = {k.replace(stem, "lora_unet_double_blocks_0_img_attn_qkw"): v for k, v in kohya.items()}
    applied, unread = comfyui_flux_load(typo, config, sizes)
    assert "double_blocks.0.img_attn.qkv" not in applied
    assert sorted(unread) == sorted(k for k in typo if "qkw" in k)
