"""SDXL exports at full size, by name (SDXL base 1.0's architecture on the meta device): kohya's
SDXL names are those of kohya's own conversion map; the LDM layout is the one diffusers
converts from; every module of every network lands where it was trained in A1111, ComfyUI,
kohya sd-scripts and diffusers' name conversion; and the names each tool would lose."""

from __future__ import annotations

import pytest
import torch

from loramill import LoramillError
from loramill.export.client_rules import check_lands, trained_modules
from loramill.export.sdxl_layout import SdxlLayout
from loramill.export.verify import Clients
from loramill.export.write import to_diffusers, to_kohya
from loramill.models.checkpoint import Checkpoint
from loramill.models.kohya_names import KohyaNames
from loramill.models.network import network_modules

ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", *ENCODERS)


@pytest.fixture(scope="module")
def full_size():
    """SDXL base 1.0's UNet and both text encoders on the meta device: names, no weights."""
    from accelerate import init_empty_weights

    from loramill.demo.full_size import SDXL
    from loramill.demo.tiny_sdxl import sdxl_models

    with init_empty_weights():
        return sdxl_models(SDXL)


# kohya sd-scripts' own diffusers → SDXL (LDM) prefixes (library/sdxl_model_util.py,
# make_unet_conversion_map), restated for the comparison
KOHYA_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
    "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection",
}  # fmt: skip


def kohya_sdxl_prefixes() -> list[tuple[str, str]]:
    prefixes = []
    for i in range(3):
        for j in range(2):
            prefixes.append((f"down_blocks.{i}.resnets.{j}.", f"input_blocks.{3 * i + j + 1}.0."))
            prefixes.append(
                (f"down_blocks.{i}.attentions.{j}.", f"input_blocks.{3 * i + j + 1}.1.")
            )
        for j in range(3):
            prefixes.append((f"up_blocks.{i}.resnets.{j}.", f"output_blocks.{3 * i + j}.0."))
            prefixes.append((f"up_blocks.{i}.attentions.{j}.", f"output_blocks.{3 * i + j}.1."))
        prefixes.append(
            (f"down_blocks.{i}.downsamplers.0.conv.", f"input_blocks.{3 * (i + 1)}.0.op.")
        )
        prefixes.append((f"up_blocks.{i}.upsamplers.0.", f"output_blocks.{3 * i + 2}.2."))
    prefixes.append(("mid_block.attentions.0.", "middle_block.1."))
    prefixes += [(f"mid_block.resnets.{j}.", f"middle_block.{2 * j}.") for j in range(2)]
    return prefixes


def kohya_sdxl_name(module: str) -> str:
    path = module + "."
    for hf, sd in kohya_sdxl_prefixes():
        if path.startswith(hf):
            rest = path[len(hf) :]
            if "resnets" in hf:
                part = rest.rstrip(".")
                rest = KOHYA_RESNET[part] + "."
            path = sd + rest
            break
    return "lora_unet_" + path.rstrip(".").replace(".", "_")


def test_full_size_sdxl_names_are_kohyas(full_size):
    """kohya's network on SDXL base: 722 UNet + 72 + 192 encoder modules; every UNet name is
    the one kohya's own conversion map gives, with the 3×3 convs of kohya_conv."""
    names = KohyaNames("sdxl", full_size["unet"].config)
    counts = [len(network_modules(full_size[c], c, "kohya")) for c in COMPONENTS]
    assert counts == [722, 72, 192]
    unet = network_modules(full_size["unet"], "unet", "kohya_conv")
    for module in unet:
        assert names.module("unet", module) == kohya_sdxl_name(module), module
    for module, name in {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        "mid_block.attentions.0.transformer_blocks.9.ff.net.2":
            "lora_unet_middle_block_1_transformer_blocks_9_ff_net_2",
        "up_blocks.0.attentions.2.proj_out": "lora_unet_output_blocks_2_1_proj_out",
        "up_blocks.0.upsamplers.0.conv": "lora_unet_output_blocks_2_2_conv",
        "up_blocks.2.resnets.2.conv_shortcut": "lora_unet_output_blocks_8_0_skip_connection",
    }.items():  # fmt: skip
        assert names.module("unet", module) == name
    assert names.module("text_encoder_2", "text_model.encoder.layers.31.self_attn.out_proj") == (
        "lora_te2_text_model_encoder_layers_31_self_attn_out_proj"
    )
    assert names.module("text_encoder", "encoder.layers.11.mlp.fc1") == (
        "lora_te1_text_model_encoder_layers_11_mlp_fc1"
    )


def fake_checkpoint(models: dict, target: str) -> Checkpoint:
    """Small random LoRA pairs (rank 1, alpha 0.5) for every module of a network on these
    models: for the clients' name rules, which read names and the factors only."""
    generator = torch.Generator().manual_seed(0)
    tensors, configs = {}, {}
    for component, model in models.items():
        for module in network_modules(model, component, target):
            tensors[f"{component}.{module}.lora_A.weight"] = torch.randn(1, 3, generator=generator)
            tensors[f"{component}.{module}.lora_B.weight"] = torch.randn(2, 1, generator=generator)
        configs[component] = {"r": 1, "lora_alpha": 0.5}
    return Checkpoint(tensors, {}, configs)


@pytest.mark.parametrize("target", ["attention", "kohya", "kohya_conv"])
def test_full_size_sdxl_files_land_every_module_in_each_tool(full_size, target, tmp_path):
    """On SDXL base's architecture, every module of every network lands where it was trained
    (by the LDM layout, not by the tools' rules) at the trained scale: the kohya file in
    A1111, ComfyUI and kohya sd-scripts, the diffusers file in ComfyUI."""
    clients = Clients(full_size)
    checkpoint = fake_checkpoint(full_size, target)
    trained = trained_modules(checkpoint)
    kohya_tools = ("AUTOMATIC1111", "ComfyUI", "kohya sd-scripts")
    files = [(to_kohya(checkpoint, clients.names), kohya_tools)]
    files += [(to_diffusers(checkpoint)[0], ("ComfyUI",))]
    for tensors, tools in files:
        for client in tools:
            expected = clients.expected(client, trained)
            assert len(expected) == len(trained)  # no two modules share a target
            check_lands(tmp_path, client, clients.load(client, tmp_path, tensors), expected, 1e-4)


def test_diffusers_reads_full_size_sdxl_kohya_names_back(full_size):
    """diffusers' SDXL loader (given the UNet config, as the pipeline gives it) turns every
    kohya SDXL name of kohya_conv back into the module it was trained on, as its
    load_lora_into_unet / _text_encoder convert them to peft keys."""
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    checkpoint = fake_checkpoint(full_size, "kohya_conv")
    kohya = to_kohya(checkpoint, KohyaNames("sdxl", full_size["unet"].config))
    config = full_size["unet"].config
    state, _ = StableDiffusionXLPipeline.lora_state_dict(kohya, unet_config=config)
    for component in COMPONENTS:
        part = {k.removeprefix(f"{component}."): v for k, v in state.items()
                if k.startswith(f"{component}.")}  # fmt: skip
        if component == "unet":
            peft = convert_unet_state_dict_to_peft(part)
        else:
            peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        loaded = {k.rsplit(".lora_", 1)[0].removeprefix("text_model.") for k in peft}
        want = {
            k.rsplit(".lora_", 1)[0].removeprefix("text_model.")
            for k in checkpoint.component(component)
        }
        assert loaded == want, component


@pytest.fixture(scope="module")
def layout(full_size):
    return SdxlLayout(full_size["unet"].config, 12, 32)


def kohya_pair(name: str) -> dict[str, torch.Tensor]:
    up, down = torch.randn(8, 4), torch.randn(4, 8)
    return {
        f"{name}.lora_up.weight": up,
        f"{name}.lora_down.weight": down,
        f"{name}.alpha": torch.tensor(2.0),
    }


def test_hand_checked_sdxl_targets_and_names_that_land_nowhere(layout):
    expected = {
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q":
            "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "lora_unet_output_blocks_5_2_conv": "diffusion_model.output_blocks.5.2.conv",
        "lora_te1_text_model_encoder_layers_3_self_attn_k_proj":
            "conditioner.embedders.0.transformer.text_model.encoder.layers.3.self_attn.k_proj",
        "lora_te2_text_model_encoder_layers_31_mlp_fc2":
            "conditioner.embedders.1.model.transformer.resblocks.31.mlp.c_proj",
        "lora_te2_text_model_encoder_layers_0_self_attn_out_proj":
            "conditioner.embedders.1.model.transformer.resblocks.0.attn.out_proj",
    }  # fmt: skip
    for kohya, ldm in expected.items():
        assert (layout.a1111(kohya), layout.comfyui(kohya)) == (ldm, ldm)
    # q, k, v are slices of OpenCLIP's packed in_proj_weight (A1111: via the attention)
    q = "conditioner.embedders.1.model.transformer.resblocks.7.attn.in_proj_weight[q]"
    assert layout.a1111("lora_te2_text_model_encoder_layers_7_self_attn_q_proj") == q
    assert layout.comfyui("lora_te2_text_model_encoder_layers_7_self_attn_q_proj") == q
    for lost in (
        "lora_unet_input_blocks_1_1_proj_in",  # SDXL's level 0 has no attention
        "lora_unet_output_blocks_8_1_proj_in",  # nor its last up level
        "lora_te2_text_model_encoder_layers_32_mlp_fc1",  # bigG has 32 layers
        "lora_te2_encoder_layers_0_mlp_fc1",  # transformers 5's path: no text_model
        # diffusers' layout under SD1.x's rules: A1111 puts this upsampler on output block 2's
        # position 1, SDXL's attention
        "lora_unet_up_blocks_0_upsamplers_0_conv",
    ):
        assert layout.a1111(lost) is None, lost
    assert layout.comfyui("lora_te2_text_model_encoder_layers_32_mlp_fc1") is None


@pytest.mark.parametrize(
    ("client", "tensors", "first"),
    [
        ("AUTOMATIC1111", kohya_pair("lora_unet_up_blocks_0_upsamplers_0_conv"),
         "lora_unet_up_blocks_0_upsamplers_0_conv"),
        # A1111 changes OpenCLIP's packed attention only with all of q, k, v and out_proj
        ("AUTOMATIC1111",
         {**kohya_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj"),
          **kohya_pair("lora_te2_text_model_encoder_layers_0_self_attn_k_proj"),
          **kohya_pair("lora_te2_text_model_encoder_layers_0_self_attn_v_proj")},
         "lora_te2_text_model_encoder_layers_0_self_attn_k_proj"),
        ("ComfyUI", kohya_pair("lora_te2_text_model_encoder_layers_32_mlp_fc1"),
         "lora_te2_text_model_encoder_layers_32_mlp_fc1"),
        # kohya's network has no layer outside its target blocks (SDXL's size embedding)
        ("kohya sd-scripts", kohya_pair("lora_unet_label_emb_0_0"), "lora_unet_label_emb_0_0"),
    ],
)  # fmt: skip
def test_a_key_an_sdxl_client_would_not_load_is_refused(
    full_size, client, tensors, first, tmp_path
):
    clients = Clients(full_size)
    load = clients.load(client, tmp_path, tensors)
    with pytest.raises(LoramillError, match=rf"{client} would not load .*first: {first}"):
        check_lands(tmp_path, client, load, {}, 1e-4)


def test_the_packed_attention_lands_whole(full_size, tmp_path):
    """With its out_proj, the q/k/v trio of a bigG layer lands in A1111, each on its slice."""
    clients = Clients(full_size)
    names = [
        f"lora_te2_text_model_encoder_layers_0_self_attn_{p}_proj" for p in ("q", "k", "v", "out")
    ]
    tensors = {k: v for name in names for k, v in kohya_pair(name).items()}
    applied, unread = clients.load("AUTOMATIC1111", tmp_path, tensors)
    attention = "conditioner.embedders.1.model.transformer.resblocks.0.attn"
    assert not unread
    assert sorted(applied) == sorted(
        [f"{attention}.in_proj_weight[{p}]" for p in "kqv"] + [f"{attention}.out_proj"]
    )
