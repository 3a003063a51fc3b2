"""Base model resolution: local folders, hub ids, and clear errors."""

from __future__ import annotations

import pytest

from loramill import LoramillError
from loramill.model_files import resolve_base_model
from loramill.models.base_model import load_pipeline


def test_local_folder_and_hub_id_are_told_apart(tiny_sd):
    assert resolve_base_model(tiny_sd) == tiny_sd
    assert resolve_base_model("stable-diffusion-v1-5/stable-diffusion-v1-5").startswith("stable")


def test_hub_id_offline_fails_with_one_line_naming_it(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LoramillError) as error:
        load_pipeline("someone/not-cached-anywhere")
    message = str(error.value)
    assert message.startswith("base_model 'someone/not-cached-anywhere': cannot load")
    assert "HF_HUB_OFFLINE" in message and "\n" not in message


def test_pickle_weights_need_opt_in(tmp_path, tiny_sd):
    import shutil

    import torch
    from safetensors.torch import load_file

    model = tmp_path / "pickled"
    shutil.copytree(tiny_sd, model)
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(weights), model / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    with pytest.raises(LoramillError, match=r"base_model '.*pickled': cannot load"):
        load_pipeline(str(model))
    assert load_pipeline(str(model), allow_unsafe_weights=True).vae is not None


def test_component_fingerprint_follows_its_own_files(tmp_path, tiny_sd):
    """Cached latents and text embeddings are keyed by their component's loaded files: another
    UNet keeps them, another VAE does not; files the loader skips change nothing."""
    import shutil

    from loramill.hashing import HashCache
    from loramill.model_files import component_fingerprint

    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd, copy)

    def vae() -> str:
        return component_fingerprint(str(copy), "vae", HashCache())

    before = vae()
    assert before == component_fingerprint(tiny_sd, "vae", HashCache())
    (copy / "vae" / "README.md").write_text("notes")
    (copy / "unet" / "config.json").write_text("{}")
    assert vae() == before
    (copy / "vae" / "config.json").write_text("{}")
    assert vae() != before
