"""Publishing with real DVC and git on a throwaway repository with a local remote."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import REPO, digest, run_tool

from loramill import LoramillError
from loramill.publish import publish

DATASETS = ["alpha", "beta"]
SUFFIXES = (".safetensors", ".diffusers.safetensors", ".md", ".html")  # publish.ARTIFACTS order
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]


def artifacts(ds):
    exports = [f"exports/{ds}{s}" for s in SUFFIXES]
    checkpoints, steps = f"results/{ds}/checkpoints", f"exports/{ds}-steps"
    grids = [f"grids/{ds}.png", f"grids/{ds}.json", f"grids/{ds}-pages"]
    loss, captions = f"results/{ds}/loss.png", f"results/{ds}/captions.jsonl"
    return [checkpoints, loss, captions, *exports, steps, *grids]


ALL = [path for ds in DATASETS for path in artifacts(ds)]
FOLDERS = [path for path in ALL if path.endswith(("checkpoints", "-steps", "-pages"))]
FILES = [path for path in ALL if path not in FOLDERS]


def git(*args, cwd):
    return subprocess.run([*GIT, *args], cwd=cwd, check=True, capture_output=True, text=True)


def write(path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def remote_objects(remote):
    return sorted(p.relative_to(remote).as_posix() for p in remote.rglob("*") if p.is_file())


def snapshot(root, names):
    """Bytes, inode and mtime: a rewrite with equal bytes still shows."""
    stats = {n: (root / n).stat() for n in names if (root / n).exists()}
    return {n: ((root / n).read_bytes(), st.st_ino, st.st_mtime_ns) for n, st in stats.items()}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """A git + DVC repository like loramill's: the project's own .gitignore, data.dvc and a
    demo remote at <root>/dvc-demo-remote. Built once; each test works on a copy."""
    root = tmp_path_factory.mktemp("template") / "repo"
    root.mkdir()
    git("init", "-q", cwd=root)
    run_tool("dvc", "init", "-q", cwd=root)
    (root / "dvc-demo-remote").mkdir()
    shutil.copy(REPO / ".gitignore", root / ".gitignore")
    write(root / "config" / "config.yaml", b"datasets:\n  alpha: {trigger: a}\n  beta: {}\n")
    write(root / "data" / "alpha" / "images" / "a.png", b"alpha image")
    write(root / "data" / "beta" / "images" / "b.png", b"beta image")
    run_tool("dvc", "add", "-q", "data", cwd=root)
    return root


def use_store(root, store):
    """Make ``store`` the repository's default remote, beside the demo remote."""
    (root / ".dvc" / "config").write_text(
        f"[core]\n    analytics = false\n    remote = store\n"
        f"['remote \"demo\"']\n    url = ../dvc-demo-remote\n"
        f"['remote \"store\"']\n    url = {store}\n"
    )


def fresh_project(template, folder):
    """A copy of the template with fake artifacts and the user's remote `store` as default."""
    root, store = folder / "repo", folder / "store"
    shutil.copytree(template, root, symlinks=True)
    store.mkdir()
    use_store(root, store)
    for path in ALL:
        file = root / path / "step-000001.safetensors" if path in FOLDERS else root / path
        write(file, os.urandom(256) + path.encode())
    return root, store


@pytest.fixture
def project(template, tmp_path):
    return fresh_project(template, tmp_path)


@pytest.fixture(scope="module")
def published(template, tmp_path_factory):
    """A project published once: the first publish of every test that starts from a published
    one (three `dvc` runs each). Tests that change it work on a copy (`republished`)."""
    root, store = fresh_project(template, tmp_path_factory.mktemp("published"))
    return root, store, publish(root, DATASETS)


@pytest.fixture
def republished(published, tmp_path):
    """A copy of the published project, its remote a copy of the published remote."""
    source, source_store, report = published
    root, store = tmp_path / "repo", tmp_path / "store"
    shutil.copytree(source, root, symlinks=True)
    shutil.copytree(source_store, store)
    use_store(root, store)
    return root, store, report


def test_publish_tracks_each_artifact_and_pushes_it(published):
    root, store, report = published
    assert sorted(report.new) == sorted(ALL) and not report.modified and not report.unchanged
    for path in FILES:
        recorded = (root / f"{path}.dvc").read_text()
        assert hashlib.md5((root / path).read_bytes()).hexdigest() in recorded
    assert not (root / "exports.dvc").exists() and not (root / "grids.dvc").exists()
    # Everything, data included, is on the remote: nothing new or missing there.
    status = run_tool("dvc", "status", "-c", "--json", cwd=root).stdout
    assert json.loads(status) == {}
    # artifacts (a folder: its manifest and file), data manifest, 2 images
    assert len(remote_objects(store)) == len(ALL) + len(FOLDERS) + 1 + 2
    # git sees the .dvc files but not the artifacts, and the printed line stages all of them.
    for path in ALL:
        assert git("check-ignore", "-q", path, cwd=root).returncode == 0
        ignored = subprocess.run(["git", "check-ignore", "-q", f"{path}.dvc"], cwd=root)
        assert ignored.returncode == 1, f"{path}.dvc is git-ignored"
    assert report.git_add[:2] == ["git", "add"]
    assert set(report.git_add[2:]) == {f"{p}.dvc" for p in ALL} | {"data.dvc"}


def test_second_publish_rewrites_nothing(republished):
    root, store, _ = republished
    names = [f"{p}.dvc" for p in ALL] + [".gitignore", "data.dvc", "exports/.gitignore"]
    before, objects = snapshot(root, names), remote_objects(store)
    result = subprocess.run(
        [sys.executable, "-m", "loramill.publish"], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "Nothing changed" in result.stdout
    assert f"git add {' '.join(f'{p}.dvc' for p in ALL)} data.dvc" in result.stdout
    assert snapshot(root, names) == before
    assert remote_objects(store) == objects


def test_changed_export_republishes_only_that_file(republished):
    root, store, _ = republished
    others = [f"{p}.dvc" for p in ALL if p != "exports/beta.safetensors"]
    before, objects = snapshot(root, others), remote_objects(store)
    write(root / "exports" / "beta.safetensors", b"retrained")
    report = publish(root, DATASETS)
    assert report.modified == ["exports/beta.safetensors"] and not report.new
    assert snapshot(root, others) == before
    assert (
        hashlib.md5(b"retrained").hexdigest() in (root / "exports/beta.safetensors.dvc").read_text()
    )
    assert len(remote_objects(store)) == len(objects) + 1
    assert json.loads(run_tool("dvc", "status", "-c", "--json", cwd=root).stdout) == {}


def test_unchanged_artifact_missing_from_cache_is_pushed_anyway(republished):
    # `dvc push` only warns (exit 0) when a tracked file is not in the cache.
    root, store, _ = republished
    shutil.rmtree(root / ".dvc" / "cache" / "files")
    shutil.rmtree(store)
    store.mkdir()
    run_tool("dvc", "add", "-q", "data", cwd=root)
    report = publish(root, DATASETS)
    assert not report.changed
    assert len(remote_objects(store)) == len(ALL) + len(FOLDERS) + 3


@pytest.mark.parametrize("how", ["by name", "by url"])
def test_demo_remote_is_refused(project, how):
    root, store = project
    demo_dir = root / "dvc-demo-remote"
    if how == "by name":
        # `demo` pointed elsewhere is still refused.
        demo_dir = root.parent / "elsewhere"
        demo_dir.mkdir()
        run_tool("dvc", "remote", "modify", "demo", "url", str(demo_dir), cwd=root)
    else:
        # Another name for the demo directory, made the default.
        run_tool("dvc", "remote", "add", "-d", "mirror", str(demo_dir), cwd=root)
    args = ["--remote", "demo"] if how == "by name" else []
    result = subprocess.run(
        [sys.executable, "-m", "loramill.publish", *args], cwd=root, capture_output=True, text=True
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "demo remote" in lines[0]
    assert "dvc remote add -d <name> <url>" in lines[0]
    assert remote_objects(demo_dir) == [] and remote_objects(store) == []
    assert not list(root.glob("*/*.dvc"))


@pytest.mark.parametrize(
    ("args", "message"),
    [(["gamma"], "unknown dataset gamma"), (["--remote", "nope"], "no DVC remote named 'nope'")],
)
def test_cli_argument_errors(project, args, message):
    root, store = project
    result = subprocess.run(
        [sys.executable, "-m", "loramill.publish", *args], cwd=root, capture_output=True, text=True
    )
    assert result.returncode == 1 and message in result.stderr
    assert not list(root.glob("*/*.dvc")) and remote_objects(store) == []


def test_dry_run_writes_and_pushes_nothing(project):
    root, store = project
    report = publish(root, DATASETS, dry_run=True)
    assert sorted(report.new) == sorted(ALL)
    assert not list(root.glob("*/*.dvc")) and remote_objects(store) == []


def test_missing_artifact_is_a_clear_error(project):
    root, store = project
    (root / "grids" / "beta.json").unlink()
    with pytest.raises(LoramillError, match=r"grids/beta\.json.*snakemake --cores 1 train_all"):
        publish(root, DATASETS)
    assert not list(root.glob("*/*.dvc")) and remote_objects(store) == []


def test_a_lycoris_dataset_publishes_without_a_diffusers_file(project):
    """A dataset trained as LoKr (through the CLI, from the config) has no diffusers-format
    export to publish; a LoRA dataset missing its one still cannot publish."""
    from loramill.publish import main

    root, _ = project
    (root / "exports" / "beta.diffusers.safetensors").unlink()
    config = "datasets:\n  alpha: {}\n  beta: {train: {network_type: lokr}}\n"
    write(root / "config" / "config.yaml", config.encode())
    with contextlib.chdir(root):
        assert main(["--dry-run"]) == 0
    report = publish(root, DATASETS, dry_run=True, without_diffusers=["beta"])
    assert sorted(report.new) == sorted(set(ALL) - {"exports/beta.diffusers.safetensors"})
    with pytest.raises(LoramillError, match=r"missing exports/beta\.diffusers\.safetensors"):
        publish(root, DATASETS, dry_run=True)


def test_data_changed_since_data_dvc_is_refused(project):
    root, store = project
    write(root / "data" / "beta" / "images" / "c.png", b"new image")
    with pytest.raises(LoramillError, match="dvc add data"):
        publish(root, DATASETS)
    assert not list(root.glob("*/*.dvc")) and remote_objects(store) == []


def test_fresh_clone_pulls_identical_artifacts(republished, tmp_path):
    root, _, report = republished
    subprocess.run(report.git_add_line, shell=True, cwd=root, check=True)
    staged = git("diff", "--cached", "--name-only", cwd=root).stdout.split()
    assert set(staged) >= {f"{p}.dvc" for p in ALL} | {"data.dvc"}
    git("add", "-A", cwd=root)  # the rest of the project (config, .dvc/, .gitignore)
    git("commit", "-q", "-m", "publish", cwd=root)
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(root), str(clone)], check=True)
    assert not (clone / "exports" / "alpha.safetensors").exists()
    run_tool("dvc", "pull", "-q", cwd=clone)
    in_folders = [f"{folder}/step-000001.safetensors" for folder in FOLDERS]
    for path in [*FILES, *in_folders, "data/alpha/images/a.png", "data/beta/images/b.png"]:
        assert digest(clone / path) == digest(root / path), path
