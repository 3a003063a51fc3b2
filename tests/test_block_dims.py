"""kohya's block-wise network options (issue #31: block_dims, block_alphas, conv_block_dims,
conv_block_alphas): each UNet module gets its block's rank and alpha by kohya's indexing
(networks/lora.py get_block_index), a block at 0 none, and the export carries each module at
its own trained scale through every client's rules."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_PROVENANCE, TINY_SD, train
from safetensors.torch import load_file, save_file

from loramill import LoramillError
from loramill.export.verify import verify_exports
from loramill.export.write import export_adapter
from loramill.models.checkpoint import read_checkpoint, save_checkpoint
from loramill.models.network import NetworkSpec, add_lora, module_scales

# kohya's block of each module, worked out by hand from get_block_index: SD by the diffusers
# name (down: 1 + 3·level + layer, samplers at + 2; mid 12; up: 13 + the same), SDXL by its
# LDM name (input_blocks.N → 1 + N, middle_block.N → 10 + N, output_blocks.N → 13 + N).
SD_BLOCKS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": 1,
    "down_blocks.0.resnets.1.conv1": 2,
    "down_blocks.1.downsamplers.0.conv": 6,
    "down_blocks.3.resnets.1.time_emb_proj": 11,
    "mid_block.attentions.0.proj_in": 12,
    "mid_block.resnets.1.conv2": 12,
    "up_blocks.0.resnets.2.conv1": 15,
    "up_blocks.0.upsamplers.0.conv": 15,
    "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": 16,
    "up_blocks.3.attentions.2.proj_out": 24,
}
SDXL_BLOCKS = {
    "down_blocks.0.resnets.0.conv1": 2,  # input_blocks.1
    "down_blocks.0.downsamplers.0.conv": 4,  # input_blocks.3
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k": 5,  # input_blocks.4
    "down_blocks.2.attentions.1.proj_out": 9,  # input_blocks.8
    "mid_block.resnets.0.conv1": 10,
    "mid_block.attentions.0.transformer_blocks.9.attn1.to_q": 11,
    "mid_block.resnets.1.conv2": 12,
    "up_blocks.0.attentions.0.proj_in": 13,  # output_blocks.0
    "up_blocks.0.upsamplers.0.conv": 15,  # output_blocks.2
    "up_blocks.2.resnets.2.conv2": 21,  # output_blocks.8
}


@pytest.mark.parametrize(("family", "expected", "count"), [("SD15", SD_BLOCKS, 25),
                                                           ("SDXL", SDXL_BLOCKS, 23)])  # fmt: skip
def test_kohyas_block_of_hand_picked_modules_on_the_full_size_unets(family, expected, count):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from loramill.demo import full_size

    with init_empty_weights():
        unet = UNet2DConditionModel(**getattr(full_size, family)["unet"])
    numbered = tuple(range(1, count + 1))  # block b's rank is b + 1: the rank tells the block
    spec = NetworkSpec("kohya_conv", 4, 4.0, block_dims=numbered, conv_block_dims=numbered)
    blocks = {name: rank - 1 for name, (rank, _) in module_scales(unet, "unet", spec).items()}
    assert {name: blocks[name] for name in expected} == expected
    used = set(blocks.values())  # SDXL's 1 (conv_in), 0 and 22 (embeddings, out) have none
    assert used == (set(range(1, 25)) if count == 25 else set(range(2, 22)))


def blockwise_checkpoint(folder, spec: NetworkSpec):
    """A checkpoint of random LoRA layers (lora_B too) on the tiny SD's UNet and CLIP."""
    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(str(TINY_SD))
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    torch.manual_seed(1)
    add_lora(models, spec, init=False)
    path = folder / "step-000001.safetensors"
    save_checkpoint(path, models, {"loramill.provenance": json.dumps(SAMPLE_PROVENANCE)})
    return path


def test_block_ranks_and_alphas_export_and_verify_module_by_module(tmp_path):
    """The tiny UNet's blocks 1, 3, 4, 12 and 13–17 (two levels of one layer): block 3 (the
    downsampler, a 3×3 conv) off, others at their own ranks and alphas, convs apart."""
    dims = [4] * 25
    dims[3], dims[13], dims[16] = 0, 2, 8
    alphas = [2.0] * 25
    alphas[13] = 8.0
    conv_dims = [2] * 25
    conv_dims[3], conv_dims[12] = 0, 6  # the downsampler (a 3×3 conv) off; the middle's
    spec = NetworkSpec("kohya_conv", 4, 2.0, block_dims=tuple(dims), block_alphas=tuple(alphas),
                       conv_block_dims=tuple(conv_dims), conv_block_alphas=(1.0,) * 25)  # fmt: skip
    checkpoint = blockwise_checkpoint(tmp_path, spec)
    paths = [tmp_path / "b.safetensors", tmp_path / "b.diffusers.safetensors"]
    export_adapter(checkpoint, *paths, "b")
    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(str(TINY_SD))
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    trained = {"unet", "text_encoder"}
    verify_exports(dict.fromkeys(paths, checkpoint), models, spec, trained)

    kohya = load_file(str(paths[0]))
    rank = lambda module: kohya[f"lora_unet_{module}.lora_down.weight"].shape[0]  # noqa: E731
    alpha = lambda module: float(kohya[f"lora_unet_{module}.alpha"])  # noqa: E731
    assert not any(k.startswith("lora_unet_down_blocks_0_downsamplers_0") for k in kohya)
    emb = "up_blocks_0_resnets_0_time_emb_proj"  # block 13: rank 2, alpha 8
    # written at the UNet's alpha, 2, its own scale folded into lora_up (diffusers' reader
    # loses other alphas of Linear modules); a 3×3 conv keeps its alpha
    source = read_checkpoint(checkpoint).tensors
    up = source["unet.up_blocks.0.resnets.0.time_emb_proj.lora_B.weight"]
    assert (rank(emb), alpha(emb)) == (2, 2.0)
    assert torch.equal(kohya[f"lora_unet_{emb}.lora_up.weight"], up * 4.0)
    # init_from reads the file back into the trained tensors, the fold undone
    from loramill.train.init_from import read_init_weights

    fresh = load_pipeline(str(TINY_SD))
    layers = {"unet": fresh.unet, "text_encoder": fresh.text_encoder}
    add_lora(layers, spec)
    read = read_init_weights(paths[0], layers, spec)
    assert read.keys() == source.keys()
    assert all(torch.equal(read[key], tensor) for key, tensor in source.items())
    assert rank("up_blocks_1_attentions_0_proj_in") == 8  # block 16
    assert (rank("mid_block_resnets_0_conv1"), alpha("mid_block_resnets_0_conv1")) == (6, 1.0)
    assert rank("down_blocks_0_resnets_0_conv1") == 2
    assert rank("down_blocks_0_attentions_0_proj_in") == 4
    assert kohya["lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight"].shape[0] == 4

    # the module counts follow the blocks: the network without them has other modules
    with pytest.raises(LoramillError, match="unet LoRA modules; network_target kohya_conv"):
        verify_exports({paths[0]: checkpoint}, models, NetworkSpec("kohya_conv", 4, 2.0), trained)
    # a module stored at another alpha than it trained with lands at the wrong scale
    kohya["lora_unet_up_blocks_1_attentions_0_proj_in.alpha"] = torch.tensor(4.0)  # was 2
    save_file(kohya, str(tmp_path / "wrong.safetensors"), read_checkpoint(paths[0]).metadata)
    with pytest.raises(LoramillError, match="up_blocks_1_attentions_0_proj_in"):
        verify_exports({tmp_path / "wrong.safetensors": checkpoint}, models, spec, trained)


def test_a_run_trains_its_blocks_and_records_them_for_kohya(prepared, tiny_sd, tmp_path):
    from loramill.export.metadata import kohya_metadata

    dims = [4] * 25
    dims[1] = 0  # the first attention (block 1) off
    written = train(prepared, tmp_path, tiny_sd, block_dims=dims, max_train_steps=2, save_steps=2)
    checkpoint = read_checkpoint(written[-1])
    unet = checkpoint.component("unet")
    assert not any(k.startswith("down_blocks.0.") for k in unet)
    assert any(k.startswith("up_blocks.1.") for k in unet)
    args = json.loads(kohya_metadata(checkpoint, checkpoint.tensors, "x")["ss_network_args"])
    assert args == {"block_dims": ",".join(map(str, dims))}

    # init_from continues it from its kohya export; another block's rank is refused
    kohya = tmp_path / "blocks.safetensors"
    export_adapter(written[-1], kohya, None, "blocks")
    again = train(prepared, tmp_path / "again", tiny_sd, block_dims=dims, init_from=str(kohya),
                  max_train_steps=1, save_steps=1)  # fmt: skip
    assert read_checkpoint(again[-1]).component("unet").keys() == unet.keys()
    dims[16] = 8
    with pytest.raises(
        LoramillError,
        match=r"unet module 'up_blocks.1.attentions.0.proj_in' has rank 4 in the file, 8 in",
    ):
        train(prepared, tmp_path / "other", tiny_sd, block_dims=dims, init_from=str(kohya))


def test_block_learning_rates_train_each_block_at_its_weight(prepared, tiny_sd, tmp_path):
    """kohya's down/mid/up_lr_weight on the tiny UNet's attentions (blocks 1, 12, 16, 17):
    block 1 at weight 0 is not trained, the others learn at weight × rate, each in its own
    parameter group, as the run's state records them."""
    from loramill.export.metadata import kohya_metadata

    down = [1.0] * 12
    down[1] = 0.0
    config = {"down_lr_weight": down, "mid_lr_weight": [0.5], "up_lr_weight": "linear"}
    config |= {"lr_scheduler": "constant", "max_train_steps": 2, "save_steps": 2}
    written = train(prepared, tmp_path, tiny_sd, call={"state_dir": tmp_path / "state"}, **config)
    (state,) = (tmp_path / "state" / "state").glob("step-*.pt")
    lrs = torch.load(state, weights_only=True)["history"][-1]["lr"]
    rate = 1e-3  # conftest's learning_rate; up_lr_weight linear: block 13 + k at k / 11
    expected = {"unet_block12": rate * 0.5, "unet_block16": rate * 3 / 11}
    expected["unet_block17"] = rate * 4 / 11
    assert lrs.keys() == expected.keys()
    assert all(lrs[name] == pytest.approx(lr, rel=1e-12) for name, lr in expected.items())
    checkpoint = read_checkpoint(written[-1])
    assert not any(k.startswith("down_blocks.0.") for k in checkpoint.component("unet"))
    args = json.loads(kohya_metadata(checkpoint, checkpoint.tensors, "x")["ss_network_args"])
    assert (args["mid_lr_weight"], args["up_lr_weight"]) == ("0.5", "linear")


def test_sdxl_block_ranks_follow_kohyas_ldm_names_and_verify(tiny_sdxl, tmp_path):
    """On SDXL kohya names the UNet's modules by their LDM path, and the block is read from
    it: every module of the kohya file has its block's rank (input_blocks.N: 1 + N,
    middle_block.N: 10 + N, output_blocks.N: 13 + N), verified in every client's rules."""
    import re

    from loramill.models.base_model import load_pipeline

    dims = tuple(2 + block % 3 for block in range(23))
    alphas = tuple(float(1 + block % 2) for block in range(23))
    spec = NetworkSpec("kohya", 4, 2.0, block_dims=dims, block_alphas=alphas)
    pipe = load_pipeline(str(tiny_sdxl))
    models = {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2")}
    torch.manual_seed(1)
    add_lora(models, spec, init=False)
    provenance = {**SAMPLE_PROVENANCE, "base_model": str(tiny_sdxl), "resolution": 1024}
    provenance |= {"family": "sdxl", "base_version": "sdxl"}
    checkpoint = tmp_path / "step-000001.safetensors"
    save_checkpoint(checkpoint, models, {"loramill.provenance": json.dumps(provenance)})
    paths = [tmp_path / "x.safetensors", tmp_path / "x.diffusers.safetensors"]
    export_adapter(checkpoint, *paths, "x", unet_config=pipe.unet.config)
    base = load_pipeline(str(tiny_sdxl))
    bases = {c: getattr(base, c) for c in models}
    verify_exports(dict.fromkeys(paths, checkpoint), bases, spec, set(models))

    first = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}
    kohya = load_file(str(paths[0]))
    downs = {k: t for k, t in kohya.items() if k.startswith("lora_unet_") and "lora_down" in k}
    assert downs
    for key, down in downs.items():
        kind, number = re.match(
            r"lora_unet_(input_blocks|middle_block|output_blocks)_(\d+)_", key
        ).groups()
        block = first[kind] + int(number)
        # each block's own alpha is folded into lora_up, the file's alpha is the UNet's
        module = key.split(".")[0]
        assert (down.shape[0], float(kohya[module + ".alpha"])) == (dims[block], 2.0), key


def test_an_sdxl_run_trains_its_blocks_at_their_ranks_and_rates(prepared, tiny_sdxl, tmp_path):
    """SDXL's 23 blocks: block_dims by the LDM names, mid_lr_weight's three middle blocks
    (10–12) and LoRA+ on each block's group, as the run's state records them."""
    dims = [4] * 23
    dims[11] = 8  # middle_block.1, the middle attention
    config = {"block_dims": dims, "mid_lr_weight": [1.0, 0.5, 1.0], "loraplus_lr_ratio": 4}
    config |= {"lr_scheduler": "constant", "max_train_steps": 2, "save_steps": 2}
    state = tmp_path / "state"
    written = train(prepared, tmp_path, str(tiny_sdxl), call={"state_dir": state}, **config)
    unet = read_checkpoint(written[-1]).component("unet")
    middle = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    assert unet[middle].shape[0] == 8
    assert unet["up_blocks.0.attentions.0.proj_in.lora_A.weight"].shape[0] == 4
    (saved,) = (state / "state").glob("step-*.pt")
    lrs = torch.load(saved, weights_only=True)["history"][-1]["lr"]
    assert (lrs["unet_block11"], lrs["unet_block11_plus"]) == pytest.approx((5e-4, 2e-3))
    assert lrs["unet_block13"] == pytest.approx(1e-3)
