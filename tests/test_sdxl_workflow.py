"""An SDXL dataset through the whole workflow (resize → caption → merge → train → export →
grid) on the tiny SDXL-architecture model, and the reruns a user relies on: none when nothing
changed, train → export → grid when a training option did."""

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


def sdxl_only(model: str):
    def change(config):
        small(config)
        config["base_model"] = model
        config["datasets"] = {DS: config["datasets"][DS]}
        config["train"]["train_text_encoder"] = True  # both encoders' LoRA in every export

    return change


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_sdxl):
    root = clone_checkout(tmp_path_factory.mktemp("sdxl") / "loramill")
    run_tool("dvc", "pull", f"data/{DS}", cwd=root)
    shutil.copytree(tiny_sdxl, root / "models" / "tiny-sdxl")
    edit_config(root, sdxl_only("models/tiny-sdxl"))
    result = run_tool("snakemake", "--cores", "2", "train_all", cwd=root)
    return root, result


def test_an_sdxl_dataset_runs_every_stage_into_sdxl_exports_and_a_grid(built):
    root, result = built
    assert "wildcards: ds=wide_bands" in result.stderr
    manifest = json.loads((root / "results" / DS / "resized" / "manifest.json").read_text())
    assert all("crop_top_left" in entry for entry in manifest["images"])
    with safe_open(str(root / "exports" / f"{DS}.safetensors"), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    prefixes = {key.split("_", 2)[1] for key in keys}  # unet, te1, te2
    assert prefixes == {"unet", "te1", "te2"}
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)  # SDXL's LDM names
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
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
