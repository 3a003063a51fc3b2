"""Export verification: full-size SD1.5 exports load completely everywhere, and each check
refuses the file it exists for."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_PROVENANCE, TINY_SD, make_random_checkpoint
from safetensors.torch import load_file, save_file

from loramill import LoramillError
from loramill.compvis_names import LdmLayout
from loramill.export import export_adapter
from loramill.export_verify import (
    check_tool_names,
    file_modules,
    verify_exports,
)
from loramill.lora import save_checkpoint
from loramill.network import NetworkSpec, add_lora


def test_full_size_sd15_kohya_export_loads_completely_everywhere(tmp_path, caplog):
    """SD1.5's UNet and CLIP-L with random weights, network_target kohya: 192 + 72 modules in
    both files, every key consumed by diffusers with the file's weights, every kohya module
    mapped by A1111's and ComfyUI's rules, strength 0 = the base."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loramill.tiny_models import CLIP_TEXT, SD15

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15["unet"])
    text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, **SD15["text_encoder"]))
    add_lora(unet, text_encoder, NetworkSpec("kohya", 4, 2.0), init=False)  # B ≠ 0
    provenance = json.dumps(SAMPLE_PROVENANCE)
    checkpoint = tmp_path / "step-000001.safetensors"
    save_checkpoint(checkpoint, unet, text_encoder, {"loramill.provenance": provenance})
    unet.delete_adapters("default")  # back to the base model
    text_encoder.delete_adapter("default")
    paths = [tmp_path / "full.safetensors", tmp_path / "full.diffusers.safetensors"]
    export_adapter(checkpoint, *paths, "full", save_precision="fp16")
    for path in paths:
        modules = file_modules(load_file(str(path)))
        assert (len(modules["unet"]), len(modules["text_encoder"])) == (192, 72)
    with caplog.at_level("INFO", logger="loramill"):
        verify_exports(paths, unet, text_encoder, "kohya", {"unet", "text_encoder"})
    assert "not the SD1.x/2.x UNet layout" not in caplog.text  # the name rules were checked
    assert caplog.text.count("192 unet modules, 72 text_encoder modules") == 2


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    checkpoint = make_random_checkpoint(folder / "ck.safetensors")
    paths = [folder / "k.safetensors", folder / "d.safetensors"]
    export_adapter(checkpoint, *paths, "tiny")
    return paths


def base_models():
    from loramill.model import load_pipeline

    pipe = load_pipeline(str(TINY_SD))
    return pipe.unet, pipe.text_encoder


def test_tiny_exports_pass_and_the_wrong_network_is_refused(tiny_export):
    unet, text_encoder = base_models()
    verify_exports(tiny_export, unet, text_encoder, "attention", {"unet", "text_encoder"})
    with pytest.raises(LoramillError, match=r"32 unet LoRA modules; network_target kohya .* 48$"):
        verify_exports(tiny_export, unet, text_encoder, "kohya", {"unet", "text_encoder"})
    with pytest.raises(LoramillError, match=r"8 text_encoder LoRA modules; .* has 0$"):
        verify_exports(tiny_export, unet, text_encoder, "attention", {"unet"})


def test_a_module_diffusers_does_not_load_is_refused(tiny_export, tmp_path):
    tensors = load_file(str(tiny_export[0]))
    # one module renamed to a layer the model does not have: same count, lost in loading
    old = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    renamed = {k.replace(old, "lora_te_text_model_encoder_layers_7_self_attn_q_proj"): v
               for k, v in tensors.items()}  # fmt: skip
    save_file(renamed, str(tmp_path / "lost.safetensors"))
    unet, text_encoder = base_models()
    with pytest.raises(LoramillError, match=r"diffusers left 1 text_encoder LoRA modules unloaded"):
        verify_exports(
            [tmp_path / "lost.safetensors"],
            unet,
            text_encoder,
            "attention",
            {"unet", "text_encoder"},
        )


def test_strength_zero_must_be_the_base(tiny_export, monkeypatch):
    unet, text_encoder = base_models()
    monkeypatch.setattr(type(unet), "set_adapters", lambda self, names, weights: None)
    with pytest.raises(LoramillError, match=r"at strength 0 the UNet's output is not the base"):
        verify_exports(tiny_export[:1], unet, text_encoder, "attention", {"unet", "text_encoder"})


def test_a_key_the_tools_would_skip_is_refused(tmp_path):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from loramill.tiny_models import SD15

    with init_empty_weights():
        config = UNet2DConditionModel(**SD15["unet"]).config
    layout = LdmLayout(config, text_layers=12)
    good = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_q"
    for name, tool in (
        (good, None),
        ("lora_unet_mid_block_attentions_0_norm_out", "AUTOMATIC1111"),
    ):
        path = tmp_path / f"{name}.safetensors"
        save_file({f"{name}.lora_down.weight": torch.zeros(1, 2)}, str(path))
        modules = file_modules(load_file(str(path)))
        if tool is None:
            check_tool_names(path, modules, layout, text_encoder=True)
            continue
        with pytest.raises(LoramillError, match=rf"{tool} maps '{name}' to no module"):
            check_tool_names(path, modules, layout, text_encoder=True)


def test_model_card_reads_the_exports_metadata(tiny_export, tmp_path):
    from loramill.model_card import write_model_card

    card_path = tmp_path / "exports" / "tiny.md"
    write_model_card(tiny_export[0], card_path, "tiny", "../grids/tiny.png")
    card = card_path.read_text()
    from safetensors import safe_open

    with safe_open(str(tiny_export[0]), framework="pt") as handle:
        sshs = handle.metadata()["sshs_model_hash"]
    assert card.startswith("# tiny\n")
    assert "Trigger words: `smplx`" in card
    assert "`<lora:tiny:0.7>`" in card
    assert "| rank | 4 |" in card and "| alpha | 2 |" in card
    # tags by count, most frequent first
    assert card.index("| smplx | 3 |") < card.index("| red circle | 2 |")
    assert "![tiny: checkpoints × strengths × prompts](../grids/tiny.png)" in card
    assert f"`{SAMPLE_PROVENANCE['data_fingerprint']}`" in card and f"`{sshs}`" in card
