"""Units of the rerun decision: fingerprints, dataset folders, locks and reasons."""

from __future__ import annotations

import importlib.metadata
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import REPO
from test_base_model_files import HUB_ID, SHA, hub_cache  # noqa: F401 (a fixture)

from loramill import LoramillError, software
from loramill.dataset_files import folder_hashes
from loramill.hashing import HashCache
from loramill.reruns.explain import explain
from loramill.reruns.fingerprints import CONDA_ENV_VAR, Job, components, fingerprint
from loramill.reruns.locks import read_lock, write_lock
from loramill.reruns.staleness import Planner, Stage
from loramill.software import release

SCRIPT = REPO / "scripts" / "grid.py"


def job(**params) -> Job:
    return Job("grid", SCRIPT, params, {}, "data/ds")


def parts(job: Job, hashes: HashCache | None = None) -> dict:
    return components(job, lambda name, path: "produced", hashes or HashCache())


def test_versions_compare_on_the_release(monkeypatch):
    assert release("2.13.0+cpu") == release("2.13.0+cu128") == release("2.13.0") == "2.13.0"
    seen = {}
    for label in ("2.13.0+cpu", "2.13.0"):
        software.versions.cache_clear()
        monkeypatch.setattr(importlib.metadata, "version", lambda package, v=label: v)
        seen[label] = fingerprint(parts(job()))
    software.versions.cache_clear()
    assert seen["2.13.0+cpu"] == seen["2.13.0"]
    monkeypatch.setattr(importlib.metadata, "version", lambda package: "2.14.0")
    assert fingerprint(parts(job())) != seen["2.13.0"]
    software.versions.cache_clear()


def test_under_conda_the_env_file_stands_for_the_versions(monkeypatch):
    monkeypatch.setenv(CONDA_ENV_VAR, "e" * 64)
    assert parts(job())["software"] == {"conda env": "e" * 64}


def test_a_hub_model_is_the_commit_the_job_fetched(hub_cache, monkeypatch):  # noqa: F811
    """A hub id not yet downloaded is stale at the first plan; the job fetches it before taking
    its fingerprint, so the next plan sees the same commit and has nothing to do."""
    import huggingface_hub

    snapshot = hub_cache.parent / "saved"
    shutil.move(hub_cache, snapshot)  # not downloaded yet
    monkeypatch.setattr(
        huggingface_hub, "snapshot_download", lambda *a, **k: shutil.copytree(snapshot, hub_cache)
    )
    planned = parts(job(base_model=HUB_ID))
    assert planned["params"]["base_model"] == f"hub:{HUB_ID}@not-downloaded"

    from loramill.model_files import fetch_base_model

    fetch_base_model(HUB_ID)  # what the job does first
    ran = parts(job(base_model=HUB_ID))
    assert ran["params"]["base_model"] == f"hub:{HUB_ID}@{SHA}"
    assert fingerprint(parts(job(base_model=HUB_ID))) == fingerprint(ran)  # the next plan


def test_files_named_by_params_count_by_content(tmp_path):
    weights = tmp_path / "init.safetensors"
    weights.write_bytes(b"one")
    first = parts(job(train={"init_from": str(weights), "rank": 4}))
    moved = tmp_path / "elsewhere.safetensors"
    weights.rename(moved)
    assert parts(job(train={"init_from": str(moved), "rank": 4})) == first
    moved.write_bytes(b"two")
    assert parts(job(train={"init_from": str(moved), "rank": 4})) != first


def test_a_caption_model_counts_by_its_files(tmp_path):
    model = tmp_path / "blip"
    (model / ".git").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"weights")
    first = parts(job(caption_model=str(model)))
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")  # not the model
    assert parts(job(caption_model=str(model))) == first
    (model / "model.safetensors").write_bytes(b"other weights")  # replaced in place
    assert parts(job(caption_model=str(model))) != first
    assert parts(job(caption_model=""))["params"] == {"caption_model": ""}


def test_a_hub_caption_model_is_its_cached_commit(hub_cache):  # noqa: F811
    from loramill.model_files import caption_model_fingerprint as model_fingerprint
    from loramill.model_files import fetch_caption_model

    assert model_fingerprint(HUB_ID, HashCache()) == f"hub:{HUB_ID}@{SHA}"
    fetch_caption_model(HUB_ID)  # cached: nothing to download, offline is fine
    assert (
        model_fingerprint("someone/not-cached", HashCache())
        == "hub:someone/not-cached@not-downloaded"
    )
    with pytest.raises(
        LoramillError, match=r"^caption model 'someone/not-cached': cannot download"
    ):
        fetch_caption_model("someone/not-cached")


def test_dataset_folders_count_what_stages_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "data" / "ds" / "images"
    images.mkdir(parents=True)
    (images / "a.png").write_bytes(b"png")
    first = folder_hashes(images, "images", HashCache())
    for junk in (".DS_Store", "Thumbs.db", "desktop.ini", "._a.png"):
        (images / junk).write_bytes(b"junk")
    assert folder_hashes(images, "images", HashCache()) == first
    (images / "b.txt").write_text("not an image: resize reports it, so it counts")
    assert set(folder_hashes(images, "images", HashCache())) == {"a.png", "b.txt"}
    captions = images.parent / "captions"
    captions.mkdir()
    (captions / "a.txt").write_text("edit")
    (captions / "notes.md").write_text("not an edit")
    assert set(folder_hashes(captions, "captions", HashCache())) == {"a.txt"}


def test_links_out_of_the_dataset_are_never_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    images = tmp_path / "data" / "ds" / "images"
    images.mkdir(parents=True)
    os.symlink("/dev/zero", images / "endless.png")  # reading it would never finish
    os.symlink(images / "loop.png", images / "loop.png")
    os.symlink(images, images / "self")
    cached = tmp_path / ".dvc" / "cache" / "files" / "md5" / "ab" / "cdef"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"pulled with cache.type symlink")
    os.symlink(cached, images / "pulled.png")
    found = folder_hashes(images, "images", HashCache())
    assert found["endless.png"] == "link:/dev/zero"
    assert found["loop.png"].startswith("link:") and found["self"].startswith("link:")
    assert found["pulled.png"] == HashCache().file(cached)


def test_reasons_are_in_the_users_terms():
    old = {
        "params": {"train": {"learning_rate": 1e-4, "rank": 4}},
        "code": {"scripts/train.py": "a", "loramill.train.loop:train_lora": "a"},
        "software": {"torch": "2.13.0"},
        "inputs": {"images": [{"a.png": "1"}], "edits": [{"a.txt": "x"}], "resized": ["r"]},
    }
    new = {
        "params": {"train": {"learning_rate": 2e-4, "rank": 4}},
        "code": {"scripts/train.py": "a", "loramill.train.loop:train_lora": "b"},
        "software": {"torch": "2.14.0"},
        "inputs": {
            "images": [{"a.png": "2", "b.png": "3"}],
            "edits": [{"a.txt": "y"}],
            "resized": ["s"],
        },
    }
    assert explain(old, new) == [
        "config train.learning_rate changed",
        "code changed (loramill.train.loop)",
        "torch 2.13.0 → 2.14.0",
        "captions edited (1 image)",
        "images changed (1 changed, 1 added)",
        "input resized changed",
    ]


def merge_stage() -> Stage:
    """The merge stage of a dataset whose human edits are data/ds/metadata.csv."""
    script = REPO / "scripts" / "merge_captions.py"
    inputs = {"metadata": ["data/ds/metadata.csv"]}
    return Stage("merge_captions", lambda ds: Job("merge_captions", script, {}, inputs, "data/ds"),
                 lambda ds: {})  # fmt: skip


def stale_reasons(hashes: HashCache) -> list[str]:
    return Planner([merge_stage()], hashes, set()).plan("ds")["merge_captions"].reasons


SEEDED = "filename,prompt\n" + "".join(f"img{n}.png,caption {n}\n" for n in range(12))


@pytest.mark.parametrize(
    ("edited", "why"),
    [
        (SEEDED.replace("caption 3", "a red disc"), "captions edited (1 image)"),
        (
            SEEDED.replace("caption 1\n", "one\n").replace("caption 2\n", "two\n"),
            "captions edited (2 images)",
        ),
        (SEEDED + "new.png,a new row\n", "captions edited (1 image)"),
        ("\ufeff" + SEEDED.replace("\n", "\r\n"), "metadata.csv changed (no image's edit)"),
    ],
)
def test_edits_to_the_table_say_how_many_images(tmp_path, monkeypatch, edited, why):
    """The planner's reason names the images whose rows changed, not "input metadata"."""
    monkeypatch.chdir(tmp_path)
    table = tmp_path / "data" / "ds" / "metadata.csv"
    table.parent.mkdir(parents=True)
    table.write_text(SEEDED, encoding="utf-8")
    hashes = HashCache()
    assert stale_reasons(hashes) == ["never built"]
    job = merge_stage().job("ds")
    built = components(job, lambda name, path: "produced", hashes)
    write_lock("ds", "merge_captions", fingerprint(built), built, {})
    assert stale_reasons(hashes) == []
    table.write_text(edited, encoding="utf-8")
    assert stale_reasons(HashCache()) == [why]


@pytest.mark.parametrize(
    ("content", "why"),
    [
        ("{not json", "unreadable"),
        ('{"format": 2, "fingerprint": "f", "components": {}}', "missing outputs"),
        ('{"fingerprint": "f", "components": {}, "outputs": {}}', "format 1"),
        ("[1, 2]", "not a JSON object"),
    ],
)
def test_an_unusable_lock_is_a_warning_not_a_traceback(tmp_path, monkeypatch, caplog, content, why):
    monkeypatch.chdir(tmp_path)
    write_lock("ds", "grid", "f", {}, {})
    assert read_lock("ds", "grid")["fingerprint"] == "f"
    Path("locks/ds/grid.json").write_text(content)
    with caplog.at_level(logging.WARNING, logger="loramill"):
        assert read_lock("ds", "grid") is None
    [record] = caplog.records
    assert why in record.getMessage() and "grid ds will be rebuilt" in record.getMessage()
    assert read_lock("other", "grid") is None  # no lock at all: no warning
    assert len(caplog.records) == 1


def chained_stages() -> list[Stage]:
    """Two stages of one dataset: ``second`` reads what ``first`` writes."""
    script = REPO / "scripts" / "merge_captions.py"

    def stage(name: str, inputs: dict[str, list[str]]) -> Stage:
        job = lambda ds: Job(name, script, {}, inputs, "data/ds")  # noqa: E731
        return Stage(name, job, lambda ds: {"out": f"results/{ds}/{name}.txt"})

    return [stage("first", {}), stage("second", {"made": ["results/ds/first.txt"]})]


def test_the_order_stages_are_defined_in_does_not_matter(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    forward = Planner(chained_stages(), HashCache(None), set()).plan("ds")
    backward = Planner(chained_stages()[::-1], HashCache(None), set()).plan("ds")
    assert list(backward) == list(forward) == ["first", "second"]  # producers first
    assert backward["second"].upstream == ["first"]
    assert backward["second"].reasons == forward["second"].reasons == ["after first"]
