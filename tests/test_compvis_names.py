"""A1111's and ComfyUI's rules for kohya keys, and the LDM layout they map into."""

from __future__ import annotations

import pytest
import torch

from loramill.demo.full_size import SD15
from loramill.demo.tiny_models import CLIP_TEXT
from loramill.export.ldm_names import LdmLayout, a1111_name, unet_pairs
from loramill.models.kohya_names import KohyaNames


@pytest.fixture(scope="module")
def sd15():
    """SD1.5's UNet and CLIP-L on the meta device: module names and configs, no weights."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, **SD15["text_encoder"]))
    return unet, text_encoder


@pytest.mark.parametrize("unet_config", ["sd15", "sdxl", "tiny_sdxl"])
def test_the_layout_is_the_one_diffusers_converts_from(unet_config):
    """Every LDM module of the generated layout (SDXL's: per-level transformer depth,
    ``label_emb``), run through diffusers' own single-file converter, lands on the diffusers
    module the layout pairs it with; they are all of the UNet's weighted modules."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    from loramill.demo.full_size import SDXL
    from loramill.demo.tiny_sdxl import TINY_SDXL

    sizes = {"sd15": SD15, "sdxl": SDXL, "tiny_sdxl": TINY_SDXL}[unet_config]["unet"]
    with init_empty_weights():
        unet = UNet2DConditionModel(**sizes)
    pairs = unet_pairs(unet.config)
    if "sdxl" in unet_config:
        assert pairs["label_emb.0.0"] == "add_embedding.linear_1"
    checkpoint, origin = {}, {}
    for ldm in sorted(pairs):
        for kind in ("weight", "bias"):
            key = f"model.diffusion_model.{ldm}.{kind}"
            checkpoint[key] = torch.tensor([float(len(origin))])
            origin[len(origin)] = (ldm, kind)
    converted = convert_ldm_unet_checkpoint(checkpoint, dict(unet.config))
    landed = {origin[int(v.item())]: k for k, v in converted.items()}
    assert len(landed) == len(origin)
    for (ldm, kind), diffusers_key in landed.items():
        assert diffusers_key == f"{pairs[ldm]}.{kind}", ldm
    weighted = {n for n, m in unet.named_modules() if getattr(m, "weight", None) is not None}
    assert set(pairs.values()) == weighted


@pytest.mark.parametrize("target", ["attention", "kohya", "kohya_conv"])
def test_every_module_of_every_network_maps_in_both_tools(sd15, target):
    from loramill.models.network import network_modules

    unet, text_encoder = sd15
    names = [KohyaNames("sd").module("unet", m) for m in network_modules(unet, "unet", target)]
    names += [
        KohyaNames("sd").module("text_encoder", m)
        for m in network_modules(text_encoder, "text_encoder", target)
    ]
    layout = LdmLayout(unet.config, text_layers=12)
    for name in names:
        a1111, comfyui = layout.a1111(name), layout.comfyui(name)
        assert a1111 is not None and a1111 == comfyui, name
    assert len({layout.a1111(name) for name in names}) == len(names)  # no two share a module


def test_hand_checked_names_and_keys_that_land_nowhere(sd15):
    layout = LdmLayout(sd15[0].config, text_layers=12)
    expected = {
        "lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k":
            "diffusion_model.input_blocks.5.1.transformer_blocks.0.attn2.to_k",
        "lora_unet_up_blocks_3_resnets_2_conv_shortcut":
            "diffusion_model.output_blocks.11.0.skip_connection",
        "lora_unet_mid_block_resnets_1_time_emb_proj":
            "diffusion_model.middle_block.2.emb_layers.1",
        "lora_unet_up_blocks_0_upsamplers_0_conv": "diffusion_model.output_blocks.2.1.conv",
        "lora_unet_up_blocks_1_upsamplers_0_conv": "diffusion_model.output_blocks.5.2.conv",
        "lora_unet_down_blocks_2_downsamplers_0_conv": "diffusion_model.input_blocks.9.0.op",
        "lora_te_text_model_encoder_layers_11_mlp_fc2":
            "transformer.text_model.encoder.layers.11.mlp.fc2",
    }  # fmt: skip
    for kohya, ldm in expected.items():
        assert (layout.a1111(kohya), layout.comfyui(kohya)) == (ldm, ldm)
    for lost in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn3_to_q",  # no attn3
        "lora_unet_down_blocks_3_attentions_0_proj_in",  # SD1.5's last down block has none
        "lora_te_encoder_layers_0_self_attn_q_proj",  # transformers 5's path: no text_model
        "lora_te_text_model_encoder_layers_12_mlp_fc1",  # CLIP-L has 12 layers
    ):
        assert (layout.a1111(lost), layout.comfyui(lost)) == (None, None), lost
    assert a1111_name("lora_unet_time_embedding_linear_2") == "diffusion_model_time_embed_2"
