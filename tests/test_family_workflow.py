"""The newer model families through the whole workflow (resize → caption → merge → train →
export → grid), side by side in one project: an SDXL dataset training LyCORIS's LoKr on the
tiny SDXL-architecture model (issue #31: its export rule writes no diffusers-format file) and
a FLUX.1 dataset on the tiny FLUX.1 [dev]-architecture one (issues #29 and #30), and
the reruns a user relies on: none when nothing changed, train → export → grid of every dataset
when a training option changed, of that dataset alone when its own did."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import clone_checkout, edit_config, run_tool, small
from safetensors import safe_open
from workflow_plans import plan

from loramill.train import config as train_config

pytestmark = [pytest.mark.workflow]

SDXL, FLUX = "wide_bands", "paper_stripes"
STAGES = ("resize", "caption", "merge_captions", "train", "export", "grid")


def families(config):
    small(config)
    config["datasets"] = {SDXL: config["datasets"][SDXL], FLUX: config["datasets"][FLUX]}
    config["datasets"][SDXL]["base_model"] = "models/tiny-sdxl"
    config["datasets"][FLUX]["base_model"] = "models/tiny-flux"
    # T5 read at 32 tokens (the tiny model's captions); the demo's train_text_encoder trains
    # both of SDXL's encoders and FLUX.1's CLIP-L, so every export holds text-encoder LoRAs
    config["datasets"][FLUX]["train"] = {
        "t5xxl_max_token_length": 32,
        "timestep_sampling": "shift",
        "gradient_checkpointing": True,  # blocks_to_swap's condition
    }
    config["datasets"][SDXL]["train"] = {"network_type": "lokr", "factor": 4}


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_sdxl, tiny_flux):
    root = clone_checkout(tmp_path_factory.mktemp("families") / "loramill")
    run_tool("dvc", "pull", f"data/{SDXL}", f"data/{FLUX}", cwd=root)
    shutil.copytree(tiny_sdxl, root / "models" / "tiny-sdxl")
    shutil.copytree(tiny_flux, root / "models" / "tiny-flux")
    edit_config(root, families)
    result = run_tool("snakemake", "--cores", "2", "train_all", cwd=root)
    return root, result


def export(root, ds, suffix=".safetensors"):
    with safe_open(str(root / "exports" / f"{ds}{suffix}"), "pt") as handle:
        return set(handle.keys()), handle.metadata()


def test_an_sdxl_dataset_runs_every_stage_into_sdxl_exports_and_a_grid(built):
    root, result = built
    assert f"wildcards: ds={SDXL}" in result.stderr
    manifest = json.loads((root / "results" / SDXL / "resized" / "manifest.json").read_text())
    assert all("crop_top_left" in entry for entry in manifest["images"])
    keys, metadata = export(root, SDXL)
    assert {key.split("_", 2)[1] for key in keys} == {"unet", "te1", "te2"}
    assert any(key.startswith("lora_unet_input_blocks_") for key in keys)  # SDXL's LDM names
    assert {key.split(".")[1] for key in keys} >= {"lokr_w1", "alpha"}
    assert not (root / "exports" / f"{SDXL}.diffusers.safetensors").exists()
    assert "export_lycoris" in result.stderr
    assert metadata["ss_network_module"] == "lycoris.kohya"
    assert json.loads(metadata["ss_network_args"]) == {"algo": "lokr", "factor": "4"}
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    grid = json.loads((root / "grids" / f"{SDXL}.json").read_text())
    assert grid["cells"] and (root / "grids" / f"{SDXL}.png").is_file()


def test_a_flux_dataset_runs_every_stage_into_flux_exports_and_a_grid(built):
    root, result = built
    assert f"wildcards: ds={FLUX}" in result.stderr
    keys, metadata = export(root, FLUX)
    assert {key.split("_", 2)[1] for key in keys} == {"unet", "te1"}  # transformer, CLIP-L
    assert "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight" in keys  # BFL names
    assert "lora_unet_single_blocks_1_linear1.alpha" in keys
    assert metadata["ss_base_model_version"] == "flux1"
    assert metadata["modelspec.architecture"] == "flux-1-dev/lora"
    keys, _ = export(root, FLUX, ".diffusers.safetensors")
    assert any(key.startswith("transformer.transformer_blocks.0.") for key in keys)
    grid = json.loads((root / "grids" / f"{FLUX}.json").read_text())
    assert grid["cells"] and (root / "grids" / f"{FLUX}.png").is_file()


def test_a_second_run_plans_nothing_and_training_changes_rerun_train_onward(
    built, tmp_path, monkeypatch
):
    root, _ = built
    assert plan(root)[1] == set()
    copy = tmp_path / "copy"
    shutil.copytree(root, copy, symlinks=True)
    # where the frozen weights wait is no part of what is trained: nothing to redo (planned
    # here as on a GPU: the tests' config trains on the CPU, where swapping is refused)
    monkeypatch.setattr(train_config, "SWAP_DEVICES", ("cuda", "cpu"))
    edit_config(copy, lambda config: config["datasets"][FLUX]["train"].update(blocks_to_swap=1))
    assert plan(copy)[1] == set()
    # -R names a rule: LoKr's export stage is export_lycoris, the grid after it is stale too
    assert plan(root, "export_lycoris")[1] == {("export_lycoris", SDXL), ("grid", SDXL)}
    edit_config(copy, lambda config: config["train"].update(learning_rate=5e-4))
    onward = {(stage, ds) for stage in ("train", "export", "grid") for ds in (SDXL, FLUX)}
    renamed = {("export_lycoris" if job == ("export", SDXL) else job[0], job[1]) for job in onward}
    # LoKr's export is its own rule of the export stage; FLUX's dataset has a validation folder
    assert plan(copy)[1] == renamed | {("validate", FLUX)}
    edit_config(copy, lambda config: config["datasets"][FLUX]["train"].update(seed=7))
    edit_config(copy, lambda config: config["train"].update(learning_rate=2e-3))  # as built
    assert plan(copy)[1] == {(stage, FLUX) for stage in ("train", "validate", "export", "grid")}
    every = {(stage, ds) for stage in (*STAGES, "validate") for ds in (SDXL, FLUX)}
    assert plan(copy)[1] < every | renamed
