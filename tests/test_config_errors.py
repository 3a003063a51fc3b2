"""Bad configuration stops Snakemake before any job, with one line naming the culprit."""

from __future__ import annotations

import json
import shutil

import pytest
import yaml
from conftest import REPO, run_tool

from loramill.demo_data import generate_dataset
from loramill.demo_text import procedure_records, write_jsonl

TEXT = "station_procedures"

WORKFLOW_FILES = ("Snakefile", "rules", "scripts", "config", "profiles", "envs", "src")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("wf")
    for name in WORKFLOW_FILES:
        source = REPO / name
        copy = shutil.copytree if source.is_dir() else shutil.copy2
        copy(source, root / name)
    (root / "models").symlink_to(REPO / "models")
    for ds, entry in yaml.safe_load((REPO / "config" / "config.yaml").read_text())[
        "datasets"
    ].items():
        if (entry or {}).get("task") == "text":
            write_jsonl(procedure_records(20), root / "data" / ds / "train.jsonl")
        else:
            generate_dataset(root / "data" / ds, "circles", 2)
    return root


def dry_run(workdir, tmp_path, override):
    extra = tmp_path / "extra.yaml"
    extra.write_text(yaml.safe_dump(override))
    return run_tool("snakemake", "-n", "--configfile", str(extra), cwd=workdir, check=False)


def error_line(result):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("loramill:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_valid_config_plans_the_whole_chain(workdir, tmp_path):
    result = dry_run(workdir, tmp_path, {})
    assert result.returncode == 0, result.stderr
    for rule in ("resize", "caption", "merge_captions", "train", "export", "grid"):
        assert rule in result.stdout
    for rule in ("text_prepare", "text_train", "text_export", "text_evaluate"):
        assert f"rule {rule}:\n" in result.stdout and f"ds={TEXT}" in result.stdout


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"train": {"rank": 0}}, "loramill: config: train.rank: 0 is less than the minimum of 1"),
        (
            {"train": {"learning_rate": "fast"}},
            "config: train.learning_rate: 'fast' is not of type",
        ),
        ({"train": {"rnak": 4}}, "config: train: unknown option ('rnak' was unexpected)"),
        ({"resize": {"resolution": 100}}, "config: resize.resolution: 100 is not a multiple of 8"),
        (
            {"datasets": {"wide_bands": {"train": {"seed": -3}}}},
            "config: datasets.wide_bands.train.seed: -3 is less than the minimum of 0",
        ),
        (
            {"caption": {"backend": "magic"}},
            "caption.backend 'magic': unknown captioner; "
            "choose one of: blip, clip, none, template, vlm, wd14",
        ),
        ({"grid": {"strengths": []}}, "config: grid.strengths: [] should be non-empty"),
        (
            {"train": {"lr_scheduler_num_cycles": 3}},
            "config: datasets.wide_bands.train.lr_scheduler_num_cycles: 3 has no effect with "
            "train.lr_scheduler: constant",
        ),
        (
            {"train": {"dtype": "float16"}},
            "loramill: config: train.dtype: replaced by train.mixed_precision (no | fp16 | bf16)",
        ),
        (
            {"train": {"lr_warmup_steps": 5}},
            "config: datasets.wide_bands.train.lr_warmup_steps: 5 has no effect with "
            "lr_scheduler: constant; use lr_scheduler: constant_with_warmup",
        ),
        (
            {"device": "cpu", "train": {"mixed_precision": "fp16"}},
            "config: datasets.wide_bands.train.mixed_precision: fp16 needs a CUDA GPU",
        ),
        (
            {"train": {"init_from": "exports/none.safetensors"}},
            "config: datasets.wide_bands.train.init_from: exports/none.safetensors is not a",
        ),
        ({"device": "gpu"}, "config: device: 'gpu' is not one of ['auto', 'cpu', 'cuda']"),
        (
            {"text": {"train": {"lora_rank": 0}}},
            "config: text.train.lora_rank: 0 is less than the minimum of 1",
        ),
        (
            {"datasets": {TEXT: {"task": "text", "text": {"prepare": {"overflow": "wrap"}}}}},
            f"config: datasets.{TEXT}.text.prepare.overflow: 'wrap' is not one of",
        ),
        (
            {"datasets": {TEXT: {"task": "txt"}}},
            f"config: datasets.{TEXT}.task: 'txt' is not one of ['image', 'text']",
        ),
        (
            {"datasets": {TEXT: {"task": "text", "base_model": "models/tiny-sd"}}},
            "loramill: base_model 'models/tiny-sd': not a transformers model folder "
            "(no config.json)",
        ),
    ],
)
def test_invalid_values_name_the_key(workdir, tmp_path, override, expected):
    assert expected in error_line(dry_run(workdir, tmp_path, override))


def test_missing_base_model_is_named(workdir, tmp_path):
    line = error_line(dry_run(workdir, tmp_path, {"base_model": "models/no-such-model"}))
    assert line == (
        "loramill: base_model 'models/no-such-model': no such folder, and not a hub id (owner/name)"
    )


def test_unreadable_base_model_is_named(workdir, tmp_path):
    broken = tmp_path / "broken-model"
    shutil.copytree(REPO / "models" / "tiny-sd", broken)
    (broken / "model_index.json").write_text("{ not json")
    line = error_line(dry_run(workdir, tmp_path, {"base_model": str(broken)}))
    assert line.startswith(f"loramill: base_model '{broken}': unreadable model_index.json")

    (broken / "model_index.json").write_text(json.dumps({"_class_name": "x"}))
    shutil.rmtree(broken / "unet")
    line = error_line(dry_run(workdir, tmp_path, {"base_model": str(broken)}))
    assert line == f"loramill: base_model '{broken}': missing component folder 'unet/'"


def test_missing_dataset_folder_suggests_dvc_pull(workdir, tmp_path):
    line = error_line(dry_run(workdir, tmp_path, {"datasets": {"ghost": {"trigger": "g"}}}))
    assert (
        line == "loramill: dataset ghost: data/ghost/images not found (new clone? run `dvc pull`)"
    )


def test_missing_text_records_suggest_dvc_pull(workdir, tmp_path):
    override = {"datasets": {"notes": {"task": "text"}}}
    line = error_line(dry_run(workdir, tmp_path, override))
    assert line == (
        "loramill: dataset notes: data/notes/train.jsonl not found (new clone? run `dvc pull`)"
    )


def test_running_without_the_profile_still_validates(workdir, tmp_path):
    result = run_tool(
        "snakemake",
        "-n",
        "--workflow-profile",
        "none",
        "--config",
        "base_model=./x",
        cwd=workdir,
        check=False,
    )
    assert "base_model './x'" in error_line(result)
