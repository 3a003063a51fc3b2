"""The LoRA network: which modules each network_target trains, and kohya's dropouts."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from conftest import digest, train

from loramill import LoramillError
from loramill.models.checkpoint import read_checkpoint
from loramill.models.network import NetworkSpec, add_dropout, add_lora, network_modules
from loramill.train.config import TrainConfig


def lora_layers(model):
    """(module name, lora_A weight shape) of every LoRA layer in a model."""
    suffix = ".lora_A.default"
    return {
        name.removesuffix(suffix): module.weight.shape
        for name, module in model.named_modules()
        if name.endswith(suffix)
    }


@pytest.mark.parametrize(
    ("spec", "unet", "conv", "text"),
    [
        (NetworkSpec("attention", 4, 4), 32, 0, 8),
        (NetworkSpec("kohya", 4, 4), 48, 0, 12),
        (NetworkSpec("kohya_conv", 4, 4, conv_rank=2), 79, 18, 12),
    ],
)
def test_network_target_decides_the_modules(tiny_sd, spec, unet, conv, text):
    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(tiny_sd)
    add_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, spec)
    unet_layers, text_layers = lora_layers(pipe.unet), lora_layers(pipe.text_encoder)
    assert (len(unet_layers), len(text_layers)) == (unet, text)
    # a wrapped layer still counts as the layer it wraps (verification counts on such models)
    assert len(network_modules(pipe.unet, "unet", spec.target)) == unet
    three_by_three = {n: s for n, s in unet_layers.items() if len(s) == 4 and s[2:] == (3, 3)}
    assert len(three_by_three) == conv
    assert all(s[0] == 2 for s in three_by_three.values())  # conv_rank
    assert all(s[0] == 4 for n, s in unet_layers.items() if n not in three_by_three)
    if spec.target == "attention":
        assert all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in unet_layers)
    else:  # feed-forward and the 1×1 proj convs of the transformer blocks too
        assert any(n.endswith("ff.net.2") for n in unet_layers)
        assert any(n.endswith("attentions.0.proj_in") for n in unet_layers)
        assert any(n.endswith("mlp.fc1") for n in text_layers)
    if conv:
        assert any(".resnets.0.conv1" in n for n in three_by_three)
        assert any("downsamplers.0.conv" in n for n in three_by_three)
        assert any(n.endswith("time_emb_proj") for n in unet_layers)  # a Linear of a ResNet
    assert all(p.requires_grad == ("lora_" in n) for n, p in pipe.unet.named_parameters())


def test_full_size_sd15_kohya_network_has_192_and_72_modules():
    """SD1.5's UNet and CLIP-L: kohya's standard module counts. Counting needs the modules,
    not their weights: built on the meta device (no memory, no random init)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loramill.demo.full_size import SD15
    from loramill.demo.tiny_models import CLIP_TEXT

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, **SD15["text_encoder"]))
    models = {"unet": unet, "text_encoder": text_encoder}
    counts = {
        target: tuple(len(network_modules(m, name, target)) for name, m in models.items())
        for target in ("attention", "kohya", "kohya_conv")
    }
    assert counts["attention"] == (128, 48)
    assert counts["kohya"] == (192, 72)
    conv = network_modules(unet, "unet", "kohya_conv")
    # 22 ResNet blocks: 3×3 conv1 and conv2, Linear time_emb_proj; 14 change their channel
    # count and have a 1×1 conv_shortcut (2 down, all 12 up). 3 down- and 3 upsampler convs.
    assert sum(kind == "conv" for kind in conv.values()) == 22 * 2 + 3 + 3
    assert counts["kohya_conv"] == (192 + 22 + 14 + 50, 72)
    add_lora({"unet": unet, "text_encoder": text_encoder}, NetworkSpec("kohya", 4, 4))
    assert (len(lora_layers(unet)), len(lora_layers(text_encoder))) == (192, 72)
    assert {p.device.type for p in unet.parameters()} == {"meta"}  # nothing was allocated


def test_full_size_sdxl_kohya_network_has_722_and_72_and_192_modules():
    """SDXL base's UNet and both text encoders (meta device): kohya's sdxl_train_network counts,
    70 transformer blocks × 10 Linears and 11 × proj_in/out; CLIP-L 12 and bigG 32 layers × 6."""
    from accelerate import init_empty_weights

    from loramill.demo.full_size import SDXL
    from loramill.demo.tiny_sdxl import sdxl_models

    with init_empty_weights():
        models = sdxl_models(SDXL)
    unet = models["unet"]
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684
    count = lambda target: tuple(  # noqa: E731
        len(network_modules(m, name.removesuffix("_2"), target)) for name, m in models.items()
    )
    assert count("kohya") == (722, 72, 192)
    assert count("attention") == (70 * 8, 48, 128)
    blocks = [n for n in network_modules(unet, "unet", "kohya") if ".transformer_blocks." in n]
    assert len(blocks) == 700


def layer_with_lora():
    """One Linear with a LoRA layer (B non-zero, so the LoRA path shows in the output)."""
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(OrderedDict(proj=torch.nn.Linear(6, 5)))
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["proj"], init_lora_weights=False)
    return inject_adapter_in_model(config, model)


def test_rank_dropout_masks_ranks_per_sample_and_rescales():
    model = layer_with_lora()
    add_dropout(model, NetworkSpec(rank_dropout=0.5))
    layer, x = model.proj, torch.randn(3, 2, 6)
    down, up = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    torch.manual_seed(7)
    out = model(x)
    torch.manual_seed(7)
    keep = (torch.rand(3, 4) > 0.5).float().reshape(3, 1, 4)  # the hook's draw, replayed
    expected = layer.base_layer(x) + (x @ down.T * keep / 0.5) @ up.T
    assert torch.allclose(out, expected, atol=1e-6)
    assert 0 < keep.sum() < keep.numel()  # this seed drops some ranks, keeps others
    model.eval()  # no dropout outside training
    full = layer.base_layer(x) + x @ down.T @ up.T
    assert torch.allclose(model(x), full, atol=1e-6)


def test_module_dropout_skips_the_whole_lora_and_network_dropout_rescales():
    model = layer_with_lora()
    add_dropout(model, NetworkSpec(module_dropout=0.5))
    layer, x = model.proj, torch.randn(2, 6)
    base = layer.base_layer(x)
    full = base + x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T
    seen = []
    for seed in range(20):
        torch.manual_seed(seed)
        out = model(x)
        seen.append("base" if torch.equal(out, base) else "full")
        assert torch.allclose(out, base if seen[-1] == "base" else full, atol=1e-6)
    assert {"base", "full"} == set(seen)

    model = layer_with_lora()
    add_dropout(model, NetworkSpec(network_dropout=0.25))
    layer = model.proj
    torch.manual_seed(3)
    out = model(x)
    torch.manual_seed(3)
    hidden = torch.nn.functional.dropout(x @ layer.lora_A["default"].weight.T, p=0.25)
    assert torch.allclose(out, layer.base_layer(x) + hidden @ layer.lora_B["default"].weight.T)


def test_dropouts_and_conv_network_train_bit_identically(prepared, tmp_path, tiny_sd):
    config = {"network_target": "kohya_conv", "conv_rank": 2, "conv_alpha": 1.0}
    config |= {"network_dropout": 0.1, "rank_dropout": 0.2, "module_dropout": 0.2}
    config |= {"flip_aug": True, "repeats": 2, "shuffle_caption": True}
    first = train(prepared, tmp_path / "a", tiny_sd, **config)
    again = train(prepared, tmp_path / "b", tiny_sd, **config)
    assert [digest(p) for p in first] == [digest(p) for p in again]
    plain = train(prepared, tmp_path / "c", tiny_sd, network_target="kohya_conv", conv_rank=2)
    tensors = read_checkpoint(first[-1]).tensors
    assert tensors.keys() == read_checkpoint(plain[-1]).tensors.keys()
    assert not all(torch.equal(tensors[k], read_checkpoint(plain[-1]).tensors[k]) for k in tensors)
    conv = read_checkpoint(first[-1]).adapter_configs["unet"]
    assert set(conv["rank_pattern"].values()) == {2} and set(conv["alpha_pattern"].values()) == {
        1.0
    }


def test_network_options_are_checked_naming_the_keys():
    with pytest.raises(LoramillError, match=r"^train\.network_target 'lokr': use attention"):
        TrainConfig(network_target="lokr").check()
    with pytest.raises(
        LoramillError,
        match=r"^train\.conv_rank: 4 has no effect with train\.network_target: kohya; "
        r"use network_target: kohya_conv",
    ):
        TrainConfig(conv_rank=4).check()
    TrainConfig(network_target="kohya_conv", conv_rank=4, conv_alpha=1.0).check()
