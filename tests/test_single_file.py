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
from loramill.export.ldm_names import ldm_checkpoint
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
