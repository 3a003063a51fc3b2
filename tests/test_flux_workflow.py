"""A FLUX.1 dataset through the whole workflow (resize → caption → merge → train → export →
grid) on the tiny FLUX.1 [dev]-architecture model, and the reruns a user relies on: none when
nothing changed, train → export → grid when a training option did (issue #30)."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import clone_checkout, edit_config, run_tool, small
from safetensors import safe_open
from workflow_plans import plan

pytestmark = [pytest.mark.workflow]

DS = "wide_bands"
CHAIN = {
    (stage, DS) for stage in ("resize", "caption", "merge_captions", "train", "export", "grid")
}


def flux_only(model: str):
    def change(config):
        small(config)
        config["base_model"] = model
        config["datasets"] = {DS: config["datasets"][DS]}
        # CLIP-L's LoRA in every export too; T5 read at 32 tokens (the tiny model's captions)
        config["train"].update(t5xxl_max_token_length=32, timestep_sampling="shift")

    return change


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_flux):
    root = clone_checkout(tmp_path_factory.mktemp("flux") / "loramill")
    run_tool("dvc", "pull", f"data/{DS}", cwd=root)
    shutil.copytree(tiny_flux, root / "models" / "tiny-flux")
    edit_config(root, flux_only("models/tiny-flux"))
    result = run_tool("snakemake", "--cores", "2", "train_all", cwd=root)
    return root, result


def test_a_flux_dataset_runs_every_stage_into_flux_exports_and_a_grid(built):
    root, result = built
    assert "wildcards: ds=wide_bands" in result.stderr
    with safe_open(str(root / "exports" / f"{DS}.safetensors"), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert {key.split("_", 2)[1] for key in keys} == {"unet", "te1"}  # transformer, CLIP-L
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys  # BFL names
    assert "lora_unet_single_blocks_1_linear1.alpha" in keys
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    with safe_open(str(root / "exports" / f"{DS}.diffusers.safetensors"), "pt") as handle:
        assert any(key.startswith("transformer.transformer_blocks.0.") for key in handle.keys())  # noqa: SIM118
    grid = json.loads((root / "grids" / f"{DS}.json").read_text())
    assert grid["cells"] and (root / "grids" / f"{DS}.png").is_file()


def test_a_second_run_plans_nothing_and_a_learning_rate_change_train_onward(built, tmp_path):
    root, _ = built
    assert plan(root)[1] == set()
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    edit_config(copy, lambda config: config["train"].update(learning_rate=5e-4))
    assert plan(copy)[1] == {(stage, DS) for stage in ("train", "export", "grid")}
    assert plan(copy)[1] < CHAIN
