"""Export verification: full-size SD1.5 exports load completely everywhere, and each check
refuses the file it exists for."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SAMPLE_PROVENANCE, TINY_SD, make_random_checkpoint
from safetensors.torch import load_file, save_file

from loramill import LoramillError
from loramill.export.client_rules import check_lands
from loramill.export.verify import file_modules, verify_exports
from loramill.export.write import export_adapter
from loramill.models.checkpoint import ADAPTER_METADATA_KEY, read_checkpoint, save_checkpoint
from loramill.models.kohya_names import KohyaNames
from loramill.models.network import NetworkSpec, add_lora


def old_layout_diffusers_file(checkpoint, path):
    """The diffusers file as exports wrote it before issue 25: the checkpoint's peft keys and
    weights, its alpha only in the adapter metadata."""
    source = read_checkpoint(checkpoint)
    tensors = {
        k.replace("text_encoder.", "text_encoder.text_model.", 1): v
        for k, v in source.tensors.items()
    }
    save_file(tensors, str(path), {ADAPTER_METADATA_KEY: source.metadata[ADAPTER_METADATA_KEY]})
    return path


def unscaled(path, out, scale):
    """``path`` with its trained scale taken out of lora_B and put back in the metadata's alpha:
    what diffusers reads at the trained scale and ComfyUI does not."""
    tensors = {k: v / scale if k.endswith(("up.weight", "lora_B.weight")) else v
               for k, v in load_file(str(path)).items()}  # fmt: skip
    metadata = json.loads(read_checkpoint(path).metadata[ADAPTER_METADATA_KEY])
    metadata |= {k: v * scale for k, v in metadata.items() if k.endswith(".lora_alpha")}
    save_file(tensors, str(out), {ADAPTER_METADATA_KEY: json.dumps(metadata)})
    return out


def filled_sd15():
    """SD1.5's UNet and CLIP-L at full size with fixed finite weights. Verification compares
    the LoRA's weights and the UNet's output at strength 0 with the base's, for which any
    weights do: built on the meta device and filled by tiling one small random block, instead
    of PyTorch's per-layer random init of 1e9 weights (most of this test's time)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loramill.demo.full_size import SD15
    from loramill.demo.tiny_models import CLIP_TEXT

    with init_empty_weights():  # buffers (CLIP's position ids) are still built for real
        unet = UNet2DConditionModel(**SD15["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, **SD15["text_encoder"]))
    block = torch.randn(4099, generator=torch.Generator().manual_seed(0)) * 0.02
    for model in (unet, text_encoder):
        for name, param in list(model.named_parameters()):
            tiled = block.repeat(-(-param.numel() // block.numel()))[: param.numel()]
            set_module_tensor_to_device(model, name, "cpu", value=tiled.view(param.shape))
    return unet, text_encoder


def test_full_size_sd15_exports_load_completely_at_the_trained_scale_everywhere(tmp_path, caplog):
    """SD1.5's UNet and CLIP-L (filled_sd15), network_target kohya: 192 + 72 modules in
    both files; the kohya file lands every module at the trained delta in diffusers, A1111,
    ComfyUI and kohya sd-scripts, the diffusers file in diffusers and ComfyUI; strength 0 =
    the base. The diffusers file of the old layout fails: ComfyUI skips its UNet attention
    keys, and with those spelled right still applies it at alpha 1 (twice the trained 2/4)."""
    unet, text_encoder = filled_sd15()
    models = {"unet": unet, "text_encoder": text_encoder}
    torch.manual_seed(0)
    add_lora(models, NetworkSpec("kohya", 4, 2.0), init=False)  # B ≠ 0
    provenance = json.dumps(SAMPLE_PROVENANCE)
    checkpoint = tmp_path / "step-000001.safetensors"
    save_checkpoint(checkpoint, models, {"loramill.provenance": provenance})
    unet.delete_adapters("default")  # back to the base model
    text_encoder.delete_adapter("default")
    paths = [tmp_path / "full.safetensors", tmp_path / "full.diffusers.safetensors"]
    export_adapter(checkpoint, *paths, "full", save_precision="fp16")
    for path in paths:
        modules = file_modules(load_file(str(path)), KohyaNames("sd"))
        assert (len(modules["unet"]), len(modules["text_encoder"])) == (192, 72)
    networks = ("kohya", {"unet", "text_encoder"})
    with caplog.at_level("INFO", logger="loramill"):
        verify_exports(dict.fromkeys(paths, checkpoint), models, *networks)
    assert "not the SD1.x/2.x UNet layout" not in caplog.text  # the name rules were checked
    modules = "192 unet modules, 72 text_encoder modules at the trained scale in"
    assert f"{modules} diffusers, AUTOMATIC1111, ComfyUI, kohya sd-scripts" in caplog.text
    assert f"{modules} diffusers, ComfyUI\n" in caplog.text

    old = old_layout_diffusers_file(checkpoint, tmp_path / "old.safetensors")
    first = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.lora_A.weight"
    with pytest.raises(LoramillError, match=rf"ComfyUI would not load 256 keys \(first: {first}\)"):
        verify_exports({old: checkpoint}, models, *networks)
    half = unscaled(paths[1], tmp_path / "alpha.safetensors", scale=0.5)
    with pytest.raises(LoramillError, match=r"ComfyUI applies diffusion_model\..* at 2× the"):
        verify_exports({half: checkpoint}, models, *networks)


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    folder = tmp_path_factory.mktemp("verify")
    checkpoint = make_random_checkpoint(folder / "ck.safetensors")
    paths = [folder / "k.safetensors", folder / "d.safetensors"]
    export_adapter(checkpoint, *paths, "tiny")
    return dict.fromkeys(paths, checkpoint)


def base_models():
    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(str(TINY_SD))
    return {"unet": pipe.unet, "text_encoder": pipe.text_encoder}


def test_tiny_exports_pass_and_the_wrong_network_is_refused(tiny_export):
    models = base_models()
    verify_exports(tiny_export, models, "attention", {"unet", "text_encoder"})
    with pytest.raises(LoramillError, match=r"32 unet LoRA modules; network_target kohya .* 48$"):
        verify_exports(tiny_export, models, "kohya", {"unet", "text_encoder"})
    with pytest.raises(LoramillError, match=r"8 text_encoder LoRA modules; .* has 0$"):
        verify_exports(tiny_export, models, "attention", {"unet"})


def test_a_module_diffusers_does_not_load_is_refused(tiny_export, tmp_path):
    kohya, checkpoint = next(iter(tiny_export.items()))
    tensors = load_file(str(kohya))
    # one module renamed to a layer the model does not have: same count, lost in loading
    old = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
    renamed = {k.replace(old, "lora_te_text_model_encoder_layers_7_self_attn_q_proj"): v
               for k, v in tensors.items()}  # fmt: skip
    save_file(renamed, str(tmp_path / "lost.safetensors"))
    models = base_models()
    with pytest.raises(LoramillError, match=r"diffusers left 1 text_encoder LoRA modules unloaded"):
        verify_exports(
            {tmp_path / "lost.safetensors": checkpoint},
            models,
            "attention",
            {"unet", "text_encoder"},
        )


def test_strength_zero_must_be_the_base(tiny_export, monkeypatch):
    models = base_models()
    monkeypatch.setattr(type(models["unet"]), "set_adapters", lambda self, names, weights: None)
    with pytest.raises(LoramillError, match=r"at strength 0 the UNet's output is not the base"):
        verify_exports(
            dict([next(iter(tiny_export.items()))]), models, "attention", {"unet", "text_encoder"}
        )


MID_Q = "mid_block.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_MID_Q = "lora_unet_" + MID_Q.replace(".", "_")
TRAINED = (torch.randn(8, 4), torch.randn(4, 8), 0.5)  # lora_B, lora_A, alpha 2 / rank 4


def kohya_pair(name, alpha=2.0):
    up, down, _ = TRAINED
    pair = {f"{name}.lora_up.weight": up, f"{name}.lora_down.weight": down}
    return pair if alpha is None else {**pair, f"{name}.alpha": torch.tensor(alpha)}


@pytest.mark.parametrize(
    ("client", "tensors", "first"),
    [
        # the old diffusers file's spelling of a UNet attention projection
        ("ComfyUI", {f"unet.{MID_Q}.lora_{p}.weight": TRAINED[0] for p in "AB"}, f"unet.{MID_Q}"),
        ("ComfyUI", {**kohya_pair(KOHYA_MID_Q), "lora_unet_bogus.lora_up.weight": TRAINED[0]},
         "lora_unet_bogus"),
        ("AUTOMATIC1111", kohya_pair("lora_unet_mid_block_attentions_0_norm_out"),
         "lora_unet_mid_block_attentions_0_norm_out"),
        # kohya's network has no layer outside its target blocks: load_state_dict drops it
        ("kohya sd-scripts", kohya_pair("lora_unet_time_embedding_linear_1"),
         "lora_unet_time_embedding_linear_1"),
    ],
)  # fmt: skip
def test_a_key_a_client_would_not_load_is_refused(sd15_clients, client, tensors, first, tmp_path):
    load = sd15_clients.load(client, tmp_path, tensors)
    with pytest.raises(LoramillError, match=rf"{client} would not load .*first: {first}"):
        check_lands(tmp_path, client, load, {}, 1e-4)


@pytest.mark.parametrize("client", ["AUTOMATIC1111", "ComfyUI", "kohya sd-scripts"])
def test_each_client_lands_a_module_at_the_trained_scale_or_is_refused(
    sd15_clients, client, tmp_path
):
    """kohya's spelling lands on the module trained (by the layout, not the tool's rule) at
    alpha / rank; without its alpha every tool applies scale 1: twice the trained 2/4."""
    expected = sd15_clients.expected(client, {("unet", MID_Q): TRAINED})
    assert list(expected) == [
        KOHYA_MID_Q
        if client == "kohya sd-scripts"
        else "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q"
    ]
    good = sd15_clients.load(client, tmp_path, kohya_pair(KOHYA_MID_Q))
    check_lands(tmp_path, client, good, expected, 1e-4)
    alpha_less = sd15_clients.load(client, tmp_path, kohya_pair(KOHYA_MID_Q, alpha=None))
    with pytest.raises(LoramillError, match=rf"{client} applies .* at 2× the trained delta"):
        check_lands(tmp_path, client, alpha_less, expected, 1e-4)
    missing = sd15_clients.expected(client, {("unet", MID_Q): TRAINED, ("unet", "x.to_k"): TRAINED})
    with pytest.raises(LoramillError, match=rf"{client} lands 1 of the 2 trained modules"):
        check_lands(tmp_path, client, good, missing, 1e-4)


def test_model_card_reads_the_exports_metadata(tiny_export, tmp_path):
    from loramill.export.model_card import write_model_card

    card_path = tmp_path / "exports" / "tiny.md"
    kohya = next(iter(tiny_export))
    write_model_card(kohya, card_path, "tiny", "../grids/tiny.png")
    card = card_path.read_text()
    from safetensors import safe_open

    with safe_open(str(kohya), framework="pt") as handle:
        sshs = handle.metadata()["sshs_model_hash"]
    assert card.startswith("# tiny\n")
    assert "Trigger words: `smplx`" in card
    assert "`<lora:tiny:0.7>`" in card
    assert (
        "`tiny.diffusers.safetensors` is the diffusers-format file: diffusers and ComfyUI" in card
    )
    assert "| rank | 4 |" in card and "| alpha | 2 |" in card
    # tags by count, most frequent first
    assert card.index("| smplx | 3 |") < card.index("| red circle | 2 |")
    assert "![tiny: checkpoints × strengths × prompts](../grids/tiny.png)" in card
    assert f"`{SAMPLE_PROVENANCE['data_fingerprint']}`" in card and f"`{sshs}`" in card


def test_locon_exports_land_each_module_at_its_own_trained_scale(tmp_path):
    """kohya_conv: linear layers at 2 / 4, 3×3 convs at 4 / 2. The diffusers file folds each
    module's own scale into its weights; diffusers' loader and kohya's rules must land every
    module at it, and a file folding one scale for all is refused."""
    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(str(TINY_SD))
    torch.manual_seed(1)
    spec = NetworkSpec("kohya_conv", 4, 2.0, conv_rank=2, conv_alpha=4.0)
    add_lora({"unet": pipe.unet, "text_encoder": pipe.text_encoder}, spec, init=False)
    checkpoint = tmp_path / "step-000001.safetensors"
    provenance = {"loramill.provenance": json.dumps(SAMPLE_PROVENANCE)}
    save_checkpoint(checkpoint, {"unet": pipe.unet, "text_encoder": pipe.text_encoder}, provenance)
    models = base_models()
    paths = [tmp_path / "c.safetensors", tmp_path / "c.diffusers.safetensors"]
    export_adapter(checkpoint, *paths, "c")
    networks = ("kohya_conv", {"unet", "text_encoder"})
    verify_exports(dict.fromkeys(paths, checkpoint), models, *networks)
    tensors = load_file(str(paths[1]))
    conv = "unet.down_blocks.0.resnets.0.conv1.lora.up.weight"
    assert conv in tensors
    tensors[conv] = tensors[conv] / 2.0 * 0.5  # folded at the linear layers' 2 / 4, not 4 / 2
    save_file(tensors, str(tmp_path / "one.safetensors"), read_checkpoint(paths[1]).metadata)
    with pytest.raises(LoramillError, match=r"diffusers applies .*resnets_0_conv1 at 0.25×"):
        verify_exports({tmp_path / "one.safetensors": checkpoint}, models, *networks)
