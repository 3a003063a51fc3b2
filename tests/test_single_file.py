"""Single-file checkpoints as base models: converted once by diffusers' own loader, trained on,
and named in the export by AUTOMATIC1111's hashes of the file."""

from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import train
from safetensors import safe_open
from safetensors.torch import save_file

from loramill import LoramillError
from loramill.export.ldm_checkpoint import ldm_checkpoint
from loramill.export.write import export_adapter
from loramill.model_files import resolve_base_model
from loramill.models.base_model import load_pipeline
from loramill.models.single_file import SOURCE_FILE, convert, main, source_checkpoint


@pytest.fixture(scope="module")
def single_file(tiny_sd, tmp_path_factory):
    """The tiny model as an AUTOMATIC1111-style checkpoint: one file in the LDM layout."""
    path = tmp_path_factory.mktemp("single") / "tiny-v1.safetensors"
    state = ldm_checkpoint(load_pipeline(tiny_sd))
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture(scope="module")
def converted(single_file, tiny_sd, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny-v1"
    assert main([str(single_file), str(out), "--config", tiny_sd]) == 0
    return out


def test_conversion_gives_the_models_weights_back(converted, tiny_sd):
    # the LDM names written above, read back by diffusers' converter: every weight in place
    original, back = load_pipeline(tiny_sd), load_pipeline(str(converted))
    for component in ("unet", "vae", "text_encoder"):
        want, got = (getattr(p, component).state_dict() for p in (original, back))
        assert want.keys() == got.keys(), component
        assert all(torch.equal(want[k], got[k]) for k in want), component


def test_the_folder_keeps_the_files_a1111_hashes(converted, single_file):
    data = single_file.read_bytes()
    assert len(data) > 0x110000  # the legacy hash reads 64 KiB at 1 MiB
    assert source_checkpoint(converted) == {
        "file": "tiny-v1.safetensors",
        "sha256": hashlib.sha256(data).hexdigest(),
        "model_hash": hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8],
    }
    assert source_checkpoint(single_file.parent) is None


def test_a_single_file_base_model_names_the_conversion(single_file):
    with pytest.raises(
        LoramillError,
        match=r"a single-file checkpoint; convert it once with "
        r"`python -m loramill\.models\.single_file .*tiny-v1\.safetensors models/tiny-v1`",
    ):
        resolve_base_model(str(single_file))  # fmt: skip


def test_conversion_refuses_pickles_and_never_overwrites(converted, single_file, tmp_path):
    with pytest.raises(LoramillError, match=r"not a \.safetensors checkpoint"):
        convert(tmp_path / "model.ckpt", tmp_path / "out", None)
    with pytest.raises(LoramillError, match="already exists"):
        convert(single_file, converted, None)
    assert not (tmp_path / "out").exists()


def test_an_adapter_trained_on_it_carries_the_a1111_hashes(
    converted, single_file, prepared, tmp_path
):
    written = train(prepared, tmp_path, str(converted), max_train_steps=1, save_steps=1)
    export_adapter(written[-1], tmp_path / "a.safetensors", None, "a")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as handle:
        meta = handle.metadata()
    source = source_checkpoint(converted)
    assert meta["ss_sd_model_name"] == "tiny-v1.safetensors"
    assert meta["ss_new_sd_model_hash"] == source["sha256"]
    assert meta["ss_sd_model_hash"] == source["model_hash"]
    assert (converted / SOURCE_FILE).is_file()


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    """The tiny SDXL with its second encoder wider than the first (48 against 32), as SDXL's
    (1280 against 768): diffusers tells the two encoders of a single file apart by width."""
    from loramill.demo.tiny_sdxl import TINY_SDXL, build_tiny_sdxl

    wide = {**TINY_SDXL["text_encoder_2"], "hidden_size": 48, "projection_dim": 48}
    unet = {**TINY_SDXL["unet"], "cross_attention_dim": 32 + 48}
    unet["projection_class_embeddings_input_dim"] = 48 + 6 * unet["addition_time_embed_dim"]
    sizes = {**TINY_SDXL, "unet": unet, "text_encoder_2": wide}
    return build_tiny_sdxl(tmp_path_factory.mktemp("sdxl-folder") / "tiny-sdxl", sizes)


@pytest.fixture(scope="module")
def sdxl_single_file(sdxl_folder, tmp_path_factory):
    """That model as sd_xl_base_1.0.safetensors is laid out: the UNet under
    ``model.diffusion_model.``, the encoders under ``conditioner.embedders.0`` / ``.1``, the
    second in OpenCLIP's layout."""
    path = tmp_path_factory.mktemp("sdxl-single") / "tiny-xl.safetensors"
    state = ldm_checkpoint(load_pipeline(str(sdxl_folder)))
    assert "model.diffusion_model.label_emb.0.0.weight" in state
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in state
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def test_an_sdxl_single_file_converts_back_with_its_hashes(
    sdxl_single_file, sdxl_folder, tmp_path, checkpoint_for
):
    """diffusers' converter reads every weight of the LDM layout written from loramill's
    tables back into place (OpenCLIP's packed attention included); the folder keeps the
    file's A1111 hashes and an adapter trained on it carries them."""
    out = tmp_path / "tiny-xl"
    assert main([str(sdxl_single_file), str(out), "--config", str(sdxl_folder)]) == 0
    original, back = load_pipeline(str(sdxl_folder)), load_pipeline(str(out))
    assert type(back).__name__ == "StableDiffusionXLPipeline"
    for component in ("unet", "vae", "text_encoder", "text_encoder_2"):
        want, got = (getattr(p, component).state_dict() for p in (original, back))
        assert want.keys() == got.keys(), component
        assert all(torch.equal(want[k], got[k]) for k in want), component
    data = sdxl_single_file.read_bytes()
    assert len(data) > 0x110000  # the legacy hash reads 64 KiB at 1 MiB
    source = source_checkpoint(out)
    assert source["sha256"] == hashlib.sha256(data).hexdigest()
    assert source["model_hash"] == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]
    export_adapter(checkpoint_for(out, source), tmp_path / "a.safetensors", None, "a")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_sd_model_name"] == "tiny-xl.safetensors"
    assert (meta["ss_new_sd_model_hash"], meta["ss_sd_model_hash"]) == (
        source["sha256"], source["model_hash"],
    )  # fmt: skip
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"


@pytest.fixture
def checkpoint_for(tmp_path):
    """A checkpoint of an adapter on a converted SDXL folder, recording the file it came
    from as training does (loramill.train.loop)."""
    import json

    from conftest import SAMPLE_PROVENANCE

    from loramill.models.checkpoint import save_checkpoint
    from loramill.models.network import NetworkSpec, add_lora

    def make(folder, source):
        pipe = load_pipeline(str(folder))
        models = {"unet": pipe.unet}
        add_lora(models, NetworkSpec("attention", 4, 2.0))
        provenance = {**SAMPLE_PROVENANCE, "base_model": str(folder), "base_model_file": source}
        provenance |= {"family": "sdxl", "base_version": "sdxl"}
        path = tmp_path / "step-000001.safetensors"
        save_checkpoint(path, models, {"loramill.provenance": json.dumps(provenance)})
        return path

    return make


def test_the_sdxl_layout_the_tools_land_on_is_the_single_files(sdxl_single_file, sdxl_folder):
    """Every module export verification lands SDXL LoRAs on (loramill.export.sdxl_layout) is
    a weight of the single file diffusers converts back above: the UNet's, CLIP-L's, and
    OpenCLIP's with q, k, v as slices of its packed in_proj_weight."""
    from loramill.export.sdxl_layout import SdxlLayout

    with safe_open(str(sdxl_single_file), "pt") as handle:
        keys = set(handle.keys())
    pipe = load_pipeline(str(sdxl_folder))
    layers = [getattr(pipe, c).config.num_hidden_layers for c in ("text_encoder", "text_encoder_2")]
    layout = SdxlLayout(pipe.unet.config, *layers)
    for module in layout.modules:
        packed = module.partition(".in_proj_weight[")[0]
        weight = f"{packed}.in_proj_weight" if packed != module else f"{module}.weight"
        assert ("model." if module.startswith("diffusion_model.") else "") + weight in keys, module
    assert len(layout.packed) == layers[1]


def test_an_sdxl_refiner_is_refused(tmp_path):
    refiner = tmp_path / "refiner.safetensors"
    save_file({"conditioner.embedders.0.model.text_projection": torch.zeros(2, 2)}, str(refiner))
    with pytest.raises(LoramillError, match="an SDXL refiner checkpoint"):
        convert(refiner, tmp_path / "out", None)
    assert not (tmp_path / "out").exists()
