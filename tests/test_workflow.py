"""The README's demo for real: fresh copy → `dvc pull` → `snakemake --cores 1 train_all`."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import clone_checkout, run_tool
from PIL import Image
from safetensors import safe_open
from snakemake.settings.enums import RerunTrigger
from test_config_errors import workdir  # noqa: F401 (a fixture)
from workflow_plans import dry_run

from loramill.files import read_jsonl

pytestmark = pytest.mark.workflow


def demo_datasets(checkout, task="image"):
    config = yaml.safe_load((checkout / "config" / "config.yaml").read_text())
    return [
        ds for ds, entry in config["datasets"].items() if (entry or {}).get("task", "image") == task
    ]


def test_every_dataset_gets_an_export_and_a_grid(demo_run):
    datasets = demo_datasets(demo_run)
    assert len(datasets) >= 2
    for ds in datasets:
        with safe_open(str(demo_run / "exports" / f"{ds}.safetensors"), "pt") as f:
            keys = list(f.keys())
            metadata = f.metadata()
        assert keys and all(k.startswith(("lora_unet_", "lora_te_")) for k in keys)
        assert metadata["ss_output_name"] == ds
        assert (demo_run / "exports" / f"{ds}.diffusers.safetensors").stat().st_size > 0
        # a kohya file of every checkpoint, and the model card
        checkpoints = sorted((demo_run / "results" / ds / "checkpoints").glob("step-*.safetensors"))
        steps = sorted(p.name for p in (demo_run / "exports" / f"{ds}-steps").glob("*.safetensors"))
        assert steps == [f"{ds}-{p.name.removeprefix('step-')}" for p in checkpoints]
        assert f"<lora:{ds}:0.7>" in (demo_run / "exports" / f"{ds}.md").read_text()
        # the adapter names the train stage that made it: the key of that stage's lock
        lock = json.loads((demo_run / "locks" / ds / "train.json").read_text())
        stage = json.loads(metadata["loramill.provenance"])["stage"]
        assert stage["fingerprint"] == lock["fingerprint"]
        assert stage["inputs"] == lock["components"]["inputs"]
        cells = json.loads((demo_run / "grids" / f"{ds}.json").read_text())
        with Image.open(demo_run / "grids" / f"{ds}.png") as grid:
            assert grid.size[0] > 0
        # checkpoints × prompts × strengths
        assert len(cells["cells"]) == len(cells["checkpoints"]) * 2 * 3
        for stage in ("resize", "caption", "merge_captions", "train", "export", "grid"):
            assert (demo_run / "logs" / stage / f"{ds}.log").exists()


def test_the_text_dataset_gets_an_adapter_a_gguf_and_an_evaluation(demo_run):
    (ds,) = demo_datasets(demo_run, "text")
    folder = demo_run / "exports" / ds
    made = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    assert made == {"adapter_model.safetensors", "adapter_config.json", "README.md",
                    "loramill_provenance.json", f"{ds}.gguf"}  # fmt: skip
    provenance = json.loads((folder / "loramill_provenance.json").read_text())
    lock = json.loads((demo_run / "locks" / ds / "text_train.json").read_text())
    assert provenance["stage"]["fingerprint"] == lock["fingerprint"]
    assert (provenance["name"], provenance["step"]) == (ds, 100)
    assert f'PeftModel.from_pretrained(base, "exports/{ds}")' in (folder / "README.md").read_text()
    # the evaluation: the base (adapter off), then each checkpoint; the adapter learned
    rows = json.loads((demo_run / "evaluations" / f"{ds}.json").read_text())["rows"]
    assert [(r["step"], r["strength"]) for r in rows] == [(0, 0), (50, 1), (100, 1)]
    assert rows[-1]["eval_loss"] < 0.25 * rows[0]["eval_loss"]
    assert all(g.startswith("First ") for g in rows[-1]["generations"])
    assert not any(g.startswith("First ") for g in rows[0]["generations"])
    table = (demo_run / "evaluations" / f"{ds}.md").read_text()
    assert f"| step 100 | {rows[-1]['eval_loss']:.4f} |" in table
    for stage in ("text_prepare", "text_train", "text_export", "text_evaluate"):
        assert (demo_run / "logs" / stage / f"{ds}.log").exists()


def test_readme_shows_the_demos_real_grid(demo_run, repo):
    pictures = re.findall(r"\]\((docs/demo/[^)]+\.png)\)", (repo / "README.md").read_text())
    assert pictures == ["docs/demo/paper_stripes.png"]
    with Image.open(repo / pictures[0]) as shown:
        shown = np.asarray(shown.convert("RGB"), dtype=np.float64)
    with Image.open(demo_run / "grids" / "paper_stripes.png") as made:
        made = np.asarray(made.convert("RGB"), dtype=np.float64)
    # The same picture; only another CPU's float rounding may move a few pixel values.
    assert shown.shape == made.shape
    assert np.abs(shown - made).mean() < 1.0


def test_checkpoints_follow_save_steps(demo_run):
    steps = {
        ds: sorted(
            p.name for p in (demo_run / "results" / ds / "checkpoints").glob("*.safetensors")
        )
        for ds in demo_datasets(demo_run)
    }
    assert steps["wide_bands"] == ["step-000100.safetensors", "step-000200.safetensors"]
    assert steps["paper_stripes"] == [f"step-{n:06d}.safetensors" for n in (50, 100, 150)]
    events = list((demo_run / "results" / "wide_bands" / "tensorboard").rglob("events.out.*"))
    assert events, "no TensorBoard event file"


def test_human_caption_edits_win_and_are_untouched(demo_run):
    edit = demo_run / "data" / "wide_bands" / "captions" / "green_band_on_black_01.txt"
    text = edit.read_text().strip()
    records = [
        json.loads(line)
        for line in (demo_run / "results" / "wide_bands" / "captions.jsonl")
        .read_text()
        .splitlines()
    ]
    by_image = {r["image"]: r for r in records}
    assert by_image["green_band_on_black_01.png"] == {
        "image": "green_band_on_black_01.png",
        "caption": f"wband, {text}",
        "source": "human",
    }
    auto = by_image["green_band_on_black_09.png"]
    assert auto["source"] == "auto" and auto["caption"].startswith("wband, green band")


def test_resized_images_are_rgb_at_their_aspect_ratio_bucket(demo_run):
    resized = demo_run / "results" / "paper_stripes" / "resized"
    manifest = json.loads((resized / "manifest.json").read_text())
    assert manifest["quarantined"] == []
    for entry in manifest["images"]:
        with Image.open(resized / entry["file"]) as image:
            assert (image.mode, list(image.size)) == ("RGB", entry["bucket"])
    # the demo's mixed sizes (3:2, 2:3, square, 16:9 …) land in three buckets of 64²
    buckets = {tuple(entry["bucket"]) for entry in manifest["images"]}
    assert buckets == {(64, 64), (80, 48), (48, 80)}


def test_exported_adapter_changes_the_base_model(demo_run):
    import torch

    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(str(demo_run / "models" / "tiny-sd"))

    def render():
        return pipe(
            "wband, a picture",
            num_inference_steps=3,
            height=64,
            width=64,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    base = render()
    pipe.load_lora_weights(str(demo_run / "exports"), weight_name="wide_bands.safetensors")
    assert np.abs(render() - base).max() > 0


def test_second_run_has_nothing_to_do(demo_run):
    result = run_tool("snakemake", "-n", "--cores", "1", "train_all", cwd=demo_run)
    assert "Nothing to be done" in result.stdout + result.stderr


def planned_resources(root, **config) -> dict[str, list[dict]]:
    """rule → its jobs' resources, as the README's GPU line plans them:
    `snakemake train_all -n -F --cores 8 --resources gpu=1 [--config …]`."""
    # the workflow profile's triggers, which the CLI reads from profiles/default
    profile = yaml.safe_load((root / "profiles" / "default" / "config.yaml").read_text())
    dag = {
        "forceall": True,
        "max_checksum_file_size": profile["max-checksum-file-size"],
        "rerun_triggers": {RerunTrigger[t.upper()] for t in profile["rerun-triggers"]},
    }
    _, jobs = dry_run(root, "train_all", config=config, dag=dag, resources={"gpu": 1}, cores=8)
    found: dict[str, list[dict]] = {}
    for job in jobs:
        found.setdefault(job.rule, []).append(job.resources)
    return found


def test_gpu_jobs_declare_the_gpu_resource(workdir):  # noqa: F811
    # The README's GPU line: at most one GPU job at a time, CPU stages in parallel. Planned in
    # this process (workflow_plans.dry_run): the resources are the ones `-n` would list.
    planned = planned_resources(workdir)
    for rule in ("train", "grid"):
        assert all(r["gpu"] == 1 and "mem_mb" in r for r in planned[rule]), planned
    assert all(r["gpu"] == 0 for r in planned["caption"])  # template captions: no model
    assert not any("gpu" in r for r in planned["resize"] + planned["merge_captions"])
    on_cpu = planned_resources(workdir, device="cpu")
    assert all(r["gpu"] == 0 for r in on_cpu["train"] + on_cpu["grid"])


def test_linked_dataset_is_read_through_its_links(tmp_path):
    """DVC's `cache.type: symlink` (its choice when the cache is on another disk): every image
    is a link into the cache, and is read as the image it is. (A grid that sets no prompts,
    as a new dataset's, shows its own training captions: test_reruns, on the small build.)"""
    checkout = clone_checkout(tmp_path / "linked")
    run_tool("dvc", "config", "--local", "cache.type", "symlink", cwd=checkout)
    run_tool("dvc", "pull", cwd=checkout)
    ds = "wide_bands"
    images = sorted((checkout / "data" / ds / "images").iterdir())
    assert images and all(p.is_symlink() for p in images)
    config = yaml.safe_load((checkout / "config" / "config.yaml").read_text())
    assert not config["grid"]["prompts"]  # a new dataset inherits no demo prompts
    run_tool("snakemake", "--cores", "2", f"results/{ds}/captions.jsonl", cwd=checkout)
    manifest = json.loads((checkout / "results" / ds / "resized" / "manifest.json").read_text())
    assert len(manifest["images"]) == len(images) and manifest["quarantined"] == []
    captions = read_jsonl(checkout / "results" / ds / "captions.jsonl")
    assert sorted(Path(r["image"]).stem for r in captions) == sorted(p.stem for p in images)


def test_report_is_one_page_with_every_datasets_grid_loss_and_card(demo_run, demo_report):
    # The README's report command, through its Makefile target (conftest.demo_report)
    page = demo_report.read_text()
    assert "<script src=" not in page  # self-contained: nothing fetched when opened
    shown = [
        *(f"{p}" for ds in demo_datasets(demo_run)
          for p in (f"grids/{ds}.png", f"results/{ds}/loss.png", f"exports/{ds}.html",
                    f"results/{ds}/overview.html")),
        *(f"{p}" for ds in demo_datasets(demo_run, "text")
          for p in (f"evaluations/{ds}.html", f"results/{ds}/adapter_loss.png",
                    f"results/{ds}/overview.html")),
    ]  # fmt: skip
    for path in shown:
        assert base64.b64encode((demo_run / path).read_bytes()).decode() in page, path
