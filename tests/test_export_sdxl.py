"""SDXL exports end to end on the tiny SDXL model: the export job's files with kohya's SDXL
names (the UNet in the LDM layout of kohya's own SDXL UNet, ``lora_te1_`` / ``lora_te2_`` for
the two encoders) and SDXL's labels, verified in every client; both files in diffusers' SDXL
pipeline at the trained scale; keys that land nowhere refused. At full size, by name:
test_export_sdxl_names."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import SAMPLE_PROVENANCE, assert_kohya_and_diffusers_agree, render
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loramill import LoramillError
from loramill.export.client_rules import trained_modules
from loramill.export.job import export_and_verify
from loramill.export.verify import verify_exports
from loramill.export.write import export_adapter, to_kohya
from loramill.models.checkpoint import Checkpoint, read_checkpoint, save_checkpoint
from loramill.models.kohya_names import (
    KohyaNames,
    checkpoint_names,
    kohya_file_modules,
    loaded_lora_modules,
    model_names,
)
from loramill.models.network import NetworkSpec, add_lora

ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", *ENCODERS)
KOHYA_SDXL_KEY = re.compile(
    r"^lora_(unet|te1|te2)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
# kohya_conv: linear layers at rank 4 / alpha 2, 3×3 convs at rank 2 / alpha 4
SPEC = NetworkSpec("kohya_conv", 4, 2.0, conv_rank=2, conv_alpha=4.0)


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def base_models(folder: Path) -> dict:
    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(str(folder))
    return {c: getattr(pipe, c) for c in COMPONENTS}


@pytest.fixture(scope="module")
def checkpoints(tiny_sdxl, tmp_path_factory) -> Path:
    """Two steps of a kohya_conv adapter on the tiny SDXL's UNet and both encoders (B ≠ 0)."""
    folder = tmp_path_factory.mktemp("sdxl-checkpoints")
    provenance = {**SAMPLE_PROVENANCE, "base_model": str(tiny_sdxl), "resolution": 1024}
    provenance |= {"family": "sdxl", "base_version": "sdxl"}
    for step in (1, 2):
        models = base_models(tiny_sdxl)
        torch.manual_seed(step)
        add_lora(models, SPEC, init=False)
        metadata = {"loramill.step": str(step), "loramill.provenance": json.dumps(provenance)}
        save_checkpoint(folder / f"step-{step:06d}.safetensors", models, metadata)
    return folder


@pytest.fixture(scope="module")
def export_job(checkpoints, tiny_sdxl, tmp_path_factory):
    """The export job on the tiny SDXL: its files and what it logged."""
    out = tmp_path_factory.mktemp("sdxl-export")
    paths = {
        "kohya": out / "exports" / "x.safetensors",
        "diffusers": out / "exports" / "x.diffusers.safetensors",
        "card": out / "exports" / "x.md",
        "steps": out / "exports" / "x-steps",
    }
    train = {"network_target": "kohya_conv", "rank": 4, "alpha": 2, "conv_rank": 2}
    train |= {"conv_alpha": 4, "train_text_encoder": True}
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("loramill")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # setLevel: it clears the loggers' cached levels too
    try:
        export_and_verify(
            checkpoints, paths["kohya"], paths["diffusers"], paths["card"], paths["steps"],
            "x", {"save_precision": "fp32"}, str(tiny_sdxl), False, train,
        )  # fmt: skip
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return paths, lines


def test_the_export_job_writes_and_verifies_every_sdxl_file(export_job, checkpoints):
    """Both files of the last step and a kohya file per step, each loaded completely at the
    trained scale by every client of its format (diffusers into SDXL's pipeline, A1111 and
    ComfyUI on the SDXL LDM layout, kohya's SDXL network); the card; SDXL's labels."""
    paths, lines = export_job
    steps = sorted(p.name for p in paths["steps"].iterdir())
    assert steps == ["x-000001.safetensors", "x-000002.safetensors"]
    counts = "119 unet modules, 12 text_encoder modules, 12 text_encoder_2 modules"
    everywhere = "diffusers, AUTOMATIC1111, ComfyUI, kohya sd-scripts"
    for path in (paths["kohya"], *(paths["steps"] / s for s in steps)):
        assert f"{path}: {counts} at the trained scale in {everywhere}" in lines
    assert f"{paths['diffusers']}: {counts} at the trained scale in diffusers, ComfyUI" in lines

    meta = metadata_of(paths["kohya"])
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0" and meta["ss_v2"] == "False"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    # kohya's SDXL LoRAs name the original UNet's modules, as kohya says
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.resolution"] == "1024x1024" and meta["ss_steps"] == "2"
    diffusers_meta = metadata_of(paths["diffusers"])
    assert diffusers_meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert diffusers_meta["modelspec.implementation"] == "https://github.com/huggingface/diffusers"
    assert metadata_of(paths["steps"] / steps[0])["ss_steps"] == "1"
    card = paths["card"].read_text()
    assert "(stable-diffusion-xl-v1-base/lora), trained by loramill for 2 steps" in card
    assert f"`{meta['sshs_model_hash']}`" in card


def test_sdxl_kohya_keys_are_kohyas_sdxl_names(export_job, checkpoints):
    """The tiny UNet's LDM layout: one ResNet per level (2 input blocks a level), transformer
    depth 2 on level 1; the encoders by their transformers path with ``text_model.``."""
    from test_export import kohya_hashes

    paths, _ = export_job
    tensors = load_file(str(paths["kohya"]))
    assert all(KOHYA_SDXL_KEY.match(key) for key in tensors), [
        k for k in tensors if not KOHYA_SDXL_KEY.match(k)
    ]
    source = read_checkpoint(checkpoints / "step-000002.safetensors").tensors
    q = "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"
    pairs = {
        "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight":
            f"unet.{q}.lora_A.weight",
        "lora_unet_input_blocks_2_0_op.lora_up.weight":
            "unet.down_blocks.0.downsamplers.0.conv.lora_B.weight",
        "lora_unet_output_blocks_1_2_conv.lora_down.weight":
            "unet.up_blocks.0.upsamplers.0.conv.lora_A.weight",
        "lora_unet_middle_block_2_emb_layers_1.lora_up.weight":
            "unet.mid_block.resnets.1.time_emb_proj.lora_B.weight",
        "lora_unet_output_blocks_3_0_skip_connection.lora_down.weight":
            "unet.up_blocks.1.resnets.1.conv_shortcut.lora_A.weight",
        "lora_te1_text_model_encoder_layers_1_mlp_fc2.lora_up.weight":
            "text_encoder.encoder.layers.1.mlp.fc2.lora_B.weight",
        "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight":
            "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight",
    }  # fmt: skip
    for kohya, checkpoint_key in pairs.items():
        assert torch.equal(tensors[kohya], source[checkpoint_key]), kohya
    assert tensors["lora_unet_input_blocks_2_0_op.alpha"].item() == 4.0  # a 3×3 conv's alpha
    assert len(tensors) == 3 * len(source) // 2
    for path in (paths["kohya"], paths["diffusers"]):
        meta = metadata_of(path)
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(path)
    # the diffusers file: SDXL's second encoder under its own component name
    diffusers = load_file(str(paths["diffusers"]))
    key = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight"
    assert torch.equal(diffusers[key], source[key])
    assert "text_encoder.text_model.encoder.layers.1.mlp.fc2.lora_B.weight" in diffusers


def test_both_files_load_into_the_sdxl_pipeline_at_the_trained_scale(export_job, checkpoints):
    """``StableDiffusionXLPipeline.load_lora_weights``: every trained module of the UNet and
    both encoders gets a layer applying alpha / rank · B @ A, nothing more; strength 0 renders
    the base model; the two files render alike."""
    from diffusers import StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    paths, _ = export_job
    source = read_checkpoint(checkpoints / "step-000002.safetensors")
    trained = trained_modules(source)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        json.loads(source.metadata["loramill.provenance"])["base_model"], add_watermarker=False
    )
    pipe.set_progress_bar_config(disable=True)
    base = render(pipe)
    for kind in ("kohya", "diffusers"):
        pipe.load_lora_weights(str(paths[kind]), adapter_name=kind)
        for component in COMPONENTS:
            layers = {
                name: layer
                for name, layer in getattr(pipe, component).named_modules()
                if isinstance(layer, LoraLayer) and kind in layer.lora_A
            }
            assert {(component, n) for n in layers} == {m for m in trained if m[0] == component}
            for name, layer in layers.items():
                up, down, scale = trained[(component, name)]
                got = layer.scaling[kind] * layer.lora_B[kind].weight.flatten(1)
                got = got @ layer.lora_A[kind].weight.flatten(1)
                torch.testing.assert_close(got, scale * up.flatten(1) @ down.flatten(1))
    # what the grid holds a loaded file against (every module of the file in use)
    models = {c: getattr(pipe, c) for c in COMPONENTS}
    names = model_names(models)
    in_file = kohya_file_modules(load_file(str(paths["kohya"])), names)
    assert [len(in_file[c]) for c in COMPONENTS] == [119, 12, 12]
    loaded = loaded_lora_modules(models, "kohya", names)
    assert {c: set(layers) for c, layers in loaded.items()} == in_file
    assert_kohya_and_diffusers_agree(pipe, base)


def renamed(path: Path, out: Path, old: str, new: str) -> Path:
    tensors = {k.replace(old, new): v for k, v in load_file(str(path)).items()}
    save_file(tensors, str(out), metadata_of(path))
    return out


@pytest.mark.parametrize(
    ("old", "new", "refusal"),
    [
        # SDXL's level 0 has no attention: an LDM name of a module the UNet does not have
        ("input_blocks_3_1_proj_in", "input_blocks_1_1_proj_in",
         r"diffusers left 1 unet LoRA modules unloaded"),
        # the first encoder under SD1.x's prefix: a module of no SDXL component
        ("lora_te1_text_model_encoder_layers_0_mlp_fc1",
         "lora_te_text_model_encoder_layers_0_mlp_fc1",
         r"1 lora_te LoRA modules; network_target kohya_conv on this base model has 0"),
    ],
)  # fmt: skip
def test_an_sdxl_key_that_lands_nowhere_is_refused(
    export_job, checkpoints, tiny_sdxl, tmp_path, old, new, refusal
):
    paths, _ = export_job
    lost = renamed(paths["kohya"], tmp_path / "lost.safetensors", old, new)
    with pytest.raises(LoramillError, match=refusal):
        verify_exports(
            {lost: checkpoints / "step-000002.safetensors"}, base_models(tiny_sdxl),
            "kohya_conv", set(COMPONENTS),
        )  # fmt: skip


def test_an_sdxl_checkpoint_is_named_by_its_base_models_unet(checkpoints, tiny_sdxl):
    """Without a UNet config the names come from the base model the provenance names; a
    checkpoint naming none cannot be named; the family is the provenance's."""
    checkpoint = read_checkpoint(checkpoints / "step-000001.safetensors")
    assert checkpoint_names(checkpoint).family == "sdxl"
    assert "lora_unet_input_blocks_2_0_op.alpha" in to_kohya(checkpoint)
    anonymous = Checkpoint(checkpoint.tensors, {}, checkpoint.adapter_configs)
    with pytest.raises(LoramillError, match="checkpoint names no base_model"):
        to_kohya(anonymous)
    with pytest.raises(LoramillError, match="the base model's UNet config is needed"):
        KohyaNames("sdxl")
    # what the provenance says decides: SD1 has no second text encoder to name
    labelled = {"loramill.provenance": json.dumps({"base_version": "sd_v1"})}
    sd1 = Checkpoint(checkpoint.tensors, labelled, checkpoint.adapter_configs)
    with pytest.raises(
        LoramillError, match=r"text_encoder_2\..*unknown component 'text_encoder_2'"
    ):
        to_kohya(sd1)


def test_export_adapter_takes_the_unet_config(checkpoints, tiny_sdxl, tmp_path):
    """The UNet config given is the one the names follow (the export job passes its base
    model's); the same names as read from the base model itself."""
    from loramill.models.base_model import load_pipeline

    config = load_pipeline(str(tiny_sdxl)).unet.config
    source = checkpoints / "step-000001.safetensors"
    given, read = tmp_path / "given.safetensors", tmp_path / "read.safetensors"
    export_adapter(source, given, None, "x", unet_config=config)
    export_adapter(source, read, None, "x")
    assert given.read_bytes() == read.read_bytes()
