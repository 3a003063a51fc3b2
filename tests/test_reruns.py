"""Content-keyed reruns, run for real: each scenario asserts the exact set of jobs that ran.

One small base state (two datasets, a few images, a few training steps) is built once with a
local DVC remote and committed; every scenario works on its own copy of it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import clone_checkout, run_tool
from PIL import Image, ImageDraw

pytestmark = pytest.mark.workflow

A, B = "wide_bands", "paper_stripes"
CHAIN = ("resize", "caption", "merge_captions", "train", "export", "grid")
SMALL = {
    "resize": {"resolution": 32},
    "train": {"max_train_steps": 2, "save_steps": 1, "train_batch_size": 1},
    "grid": {"prompts": ["{trigger}"], "strengths": [0.0, 1.0], "num_inference_steps": 2},
}
GIT = ["git", "-c", "user.name=loramill-tests", "-c", "user.email=tests@loramill.invalid"]


def git(cwd: Path, *args: str) -> str:
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def edit_config(root: Path, change) -> None:
    path = root / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    change(config)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def snakemake(root: Path, *args: str):
    return run_tool("snakemake", *args, cwd=root)


def jobs(result) -> set[tuple[str, str]]:
    """(rule, dataset) of every job Snakemake started, from its own report."""
    found = set()
    for block in re.split(r"\n(?=\[[^\]]+\]\n)", result.stdout + "\n" + result.stderr):
        rule = re.search(r"^(?:local)?rule (\w+):", block, re.MULTILINE)
        ds = re.search(r"wildcards: ds=(\S+)", block)
        if rule and ds:
            found.add((rule.group(1), ds.group(1)))
    return found


def computed(root: Path, ran: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Jobs that did their work, as opposed to restoring it from the run-cache."""
    return {
        (rule, ds)
        for rule, ds in ran
        if "restored from the run-cache" not in (root / "logs" / rule / f"{ds}.log").read_text()
    }


def chain(ds: str, *stages: str) -> set[tuple[str, str]]:
    return {(stage, ds) for stage in (stages or CHAIN)}


def run(root: Path, *args: str):
    result = snakemake(root, "--cores", "1", "train_all", *args)
    return result, jobs(result)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """A committed repository whose datasets are all built, with its own DVC remote."""
    root = clone_checkout(tmp_path_factory.mktemp("base") / "repo")
    run_tool("dvc", "pull", cwd=root)
    edit_config(root, lambda c: [c[section].update(values) for section, values in SMALL.items()])
    remote = tmp_path_factory.mktemp("remote")
    run_tool("dvc", "remote", "add", "-d", "team", str(remote), cwd=root)
    run_tool("dvc", "push", cwd=root)
    ran = run(root)[1]
    assert ran == chain(A) | chain(B)
    run_tool("python", "-m", "loramill.publish", cwd=root)
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "built")
    return root


@pytest.fixture
def repo(base, tmp_path) -> Path:
    copy = tmp_path / "repo"
    shutil.copytree(base, copy, symlinks=True)
    return copy


def test_no_change_runs_nothing(repo):
    assert run(repo)[1] == set()


def test_touching_every_file_runs_nothing(repo):
    for folder in ("data", "scripts", "src", "config"):
        for path in (repo / folder).rglob("*"):
            if path.is_file():
                path.touch()
    assert run(repo)[1] == set()


def test_changed_image_reruns_that_datasets_chain(repo):
    image = sorted((repo / "data" / A / "images").glob("*.png"))[0]
    with Image.open(image) as original:
        changed = original.convert("RGB")
    ImageDraw.Draw(changed).ellipse(  # a mark in the middle, which the square crop keeps
        [
            (changed.width / 2 - 4, changed.height / 2 - 4),
            (changed.width / 2 + 4, changed.height / 2 + 4),
        ],
        fill=(255, 0, 255),
    )
    changed.save(image)
    result, ran = run(repo)
    assert ran == chain(A)
    # Template captions come from file names, so re-captioning gave the same captions and the
    # merge was restored from the run-cache (early cutoff); training used the new pixels.
    assert computed(repo, ran) == chain(A) - {("merge_captions", A)}
    assert f"stale: resize {A}: images changed (1 changed)" in result.stderr


def test_caption_edit_reruns_merge_onward_and_says_why(repo):
    (repo / "data" / A / "captions" / "green_band_on_black_09.txt").write_text("a green disc\n")
    result, ran = run(repo)
    assert ran == chain(A, "merge_captions", "train", "export", "grid")
    assert f"stale: merge_captions {A}: captions edited (1 image)" in result.stderr
    assert f"stale: train {A}: after merge_captions" in result.stderr


def set_learning_rate(value):
    def change(config):
        config["datasets"][A].setdefault("train", {})["learning_rate"] = value

    return change


def test_learning_rate_reruns_train_onward_and_revert_restores(repo):
    config = yaml.safe_load((repo / "config" / "config.yaml").read_text())
    global_rate = config["train"]["learning_rate"]
    edit_config(repo, set_learning_rate(global_rate * 2))
    result, ran = run(repo)
    assert ran == computed(repo, ran) == chain(A, "train", "export", "grid")
    assert f"stale: train {A}: config train.learning_rate changed" in result.stderr

    edit_config(repo, set_learning_rate(global_rate))  # back to the value it had
    result, ran = run(repo)
    assert ran == chain(A, "train", "export", "grid")
    assert computed(repo, ran) == set(), "the revert retrained instead of using the run-cache"
    assert run(repo)[1] == set()


def test_grid_axis_change_reruns_grids_only(repo):
    edit_config(repo, lambda c: c["grid"].update(strengths=[0.0, 0.5, 1.0]))
    assert run(repo)[1] == {("grid", A), ("grid", B)}


def test_export_code_change_reruns_export_and_grid_everywhere(repo):
    export = repo / "src" / "loramill" / "export.py"
    export.write_text(export.read_text() + "\n# a changed export module\n")
    ran = run(repo)[1]
    assert ran == chain(A, "export", "grid") | chain(B, "export", "grid")


def test_identical_captions_after_a_recaption_do_not_retrain(repo):
    caption = repo / "src" / "loramill" / "caption.py"
    caption.write_text(caption.read_text() + "\n# same captions, different code\n")
    ran = run(repo)[1]
    assert {("caption", A), ("caption", B)} <= ran
    # Everything downstream found byte-identical inputs: restored, not recomputed (early cutoff).
    assert computed(repo, ran) == {("caption", A), ("caption", B)}


def test_new_dataset_runs_only_its_chain(repo):
    shutil.copytree(repo / "data" / B, repo / "data" / "extra")
    edit_config(repo, lambda c: c["datasets"].update(extra={"trigger": "xtra"}))
    assert run(repo)[1] == chain("extra")


def test_removed_dataset_leaves_the_rest_alone(repo):
    edit_config(repo, lambda c: c["datasets"].pop(B))
    assert run(repo)[1] == set()


def test_fresh_clone_and_dvc_pull_schedules_no_training(base, tmp_path):
    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(base), str(clone))
    run_tool("dvc", "pull", cwd=clone)
    result = snakemake(clone, "-n", "train_all")
    assert "Nothing to be done" in result.stdout + result.stderr
    assert jobs(result) == set()
    for ds in (A, B):
        assert (clone / "exports" / f"{ds}.safetensors").read_bytes() == (
            base / "exports" / f"{ds}.safetensors"
        ).read_bytes()


def test_teammates_new_image_reruns_that_chain_after_clone(base, tmp_path):
    teammate = tmp_path / "teammate"
    git(tmp_path, "clone", "-q", str(base), str(teammate))
    run_tool("dvc", "pull", cwd=teammate)
    shutil.copy(
        sorted((teammate / "data" / A / "images").glob("*.png"))[0],
        teammate / "data" / A / "images" / "new_image.png",
    )
    run_tool("dvc", "add", "data", cwd=teammate)
    run_tool("dvc", "push", cwd=teammate)
    git(teammate, "commit", "-q", "-am", "new image, not retrained")

    mine = tmp_path / "mine"
    git(tmp_path, "clone", "-q", str(teammate), str(mine))
    run_tool("dvc", "pull", cwd=mine)
    result = snakemake(mine, "-n", "train_all")
    assert jobs(result) == chain(A)
    assert f"stale: resize {A}: images changed (1 added)" in result.stderr


def test_two_cores_end_in_the_same_state_as_one(base, tmp_path):
    parallel = clone_checkout(tmp_path / "parallel", source=base)
    run_tool("dvc", "pull", cwd=parallel)
    shutil.rmtree(parallel / "locks")
    result = snakemake(parallel, "--cores", "2", "train_all")
    assert jobs(result) == chain(A) | chain(B)
    outputs = ["locks", "exports", "grids", "results"]
    for folder in outputs:
        for path in (base / folder).rglob("*"):
            if path.is_file() and "tensorboard" not in path.parts and path.suffix != ".dvc":
                twin = parallel / path.relative_to(base)
                assert twin.read_bytes() == path.read_bytes(), path.relative_to(base)


def test_without_the_profile_it_stops_and_says_how(repo):
    result = run_tool("snakemake", "-n", "--workflow-profile", "none", cwd=repo, check=False)
    assert result.returncode != 0
    assert "loramill: content-keyed reruns need the workflow profile" in result.stderr
