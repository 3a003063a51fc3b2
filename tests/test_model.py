"""Base model resolution: local folders, hub ids, and clear errors."""

from __future__ import annotations

import pytest

from loramill import LoramillError
from loramill.model import base_model_hash, load_pipeline, resolve_base_model


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


def test_base_model_hash_follows_content(tmp_path, tiny_sd):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_sd, copy)
    assert base_model_hash(str(copy)) == base_model_hash(tiny_sd)
    (copy / "scheduler" / "scheduler_config.json").write_text("{}")
    assert base_model_hash(str(copy)) != base_model_hash(tiny_sd)
