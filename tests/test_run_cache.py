"""The run-cache: outputs kept under a fingerprint by hardlink, restored anywhere, capped by gc."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, digest

from loramill.files import write_text
from loramill.reruns import run_cache
from loramill.reruns.run_cache import COMPLETE, GcReport, gc, parse_size, restore, store

FP1, FP2, FP3 = ("1" * 64, "2" * 64, "3" * 64)


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A working directory with one dataset's outputs: a checkpoint folder and a file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(run_cache.MAX_GB_ENV, raising=False)
    write_text("results/a/checkpoints/step-1/adapter.safetensors", "weights 1")
    write_text("results/a/checkpoints/state.json", "{}")
    write_text("results/a/checkpoints/.snakemake_timestamp", "")
    Path("results/a/checkpoints/empty").mkdir()
    write_text("results/a/kohya.safetensors", "kohya")
    return tmp_path


def outputs(ds: str) -> dict[str, str]:
    return {
        "checkpoints": f"results/{ds}/checkpoints",
        "kohya": f"results/{ds}/kohya.safetensors",
        "log": f"logs/{ds}/train.log",  # optional: absent here
    }


def entry(fingerprint: str) -> Path:
    return run_cache.RUNS / fingerprint


def test_round_trip_into_another_dataset(project):
    store(FP1, outputs("a"))
    assert restore(FP1, outputs("b"))
    assert Path("results/b/checkpoints/step-1/adapter.safetensors").read_text() == "weights 1"
    assert Path("results/b/checkpoints/state.json").read_text() == "{}"
    assert Path("results/b/checkpoints/empty").is_dir()
    assert Path("results/b/kohya.safetensors").read_text() == "kohya"
    assert not Path("results/b/checkpoints/.snakemake_timestamp").exists()
    assert not Path("logs/b/train.log").exists()  # absent from the entry: left alone
    assert not list(Path("results/b").glob(".*"))  # no temporary folders left beside
    assert sorted(p.name for p in entry(FP1).iterdir()) == [COMPLETE, "checkpoints", "kohya"]


def test_restore_false_without_a_complete_entry(project):
    assert not restore(FP1, outputs("b"))
    store(FP1, outputs("a"))
    (entry(FP1) / COMPLETE).unlink()
    assert not restore(FP1, outputs("b"))
    assert not Path("results/b").exists()


def test_folder_files_are_hardlinked_and_read_only(project):
    store(FP1, outputs("a"))
    restore(FP1, outputs("b"))
    cached = entry(FP1) / "checkpoints/step-1/adapter.safetensors"
    restored = Path("results/b/checkpoints/step-1/adapter.safetensors")
    assert restored.stat().st_ino == cached.stat().st_ino
    assert not restored.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def test_file_outputs_stay_writable(project):
    # Snakemake refuses to rerun a job whose output file is write-protected.
    store(FP1, outputs("a"))
    restore(FP1, outputs("b"))
    cached = entry(FP1) / "kohya"
    assert not cached.stat().st_mode & stat.S_IWUSR
    for output in ("results/a/kohya.safetensors", "results/b/kohya.safetensors"):
        assert Path(output).stat().st_mode & stat.S_IWUSR
        assert Path(output).stat().st_ino != cached.stat().st_ino


def test_atomic_rewrite_of_an_output_leaves_the_entry(project):
    store(FP1, outputs("a"))
    write_text("results/a/kohya.safetensors", "retrained")  # temp file + os.replace
    write_text("results/a/checkpoints/state.json", '{"step": 2}')
    assert (entry(FP1) / "kohya").read_text() == "kohya"
    assert (entry(FP1) / "checkpoints/state.json").read_text() == "{}"


def test_restore_replaces_existing_outputs(project):
    store(FP1, outputs("a"))
    write_text("results/b/checkpoints/stale/old.safetensors", "old")
    write_text("results/b/kohya.safetensors", "old kohya")
    Path("results/b/kohya.safetensors").chmod(0o444)
    assert restore(FP1, outputs("b"))
    assert not Path("results/b/checkpoints/stale").exists()
    assert Path("results/b/checkpoints/state.json").read_text() == "{}"
    assert Path("results/b/kohya.safetensors").read_text() == "kohya"


def test_restore_touches_the_entry(project):
    store(FP1, outputs("a"))
    os.utime(entry(FP1), (1000, 1000))
    restore(FP1, outputs("b"))
    assert entry(FP1).stat().st_mtime > 1000


def test_store_is_a_no_op_when_cached(project):
    store(FP1, outputs("a"))
    write_text("results/a/kohya.safetensors", "different")
    store(FP1, outputs("a"))
    assert (entry(FP1) / "kohya").read_text() == "kohya"


def test_concurrent_store_of_the_same_fingerprint(project, monkeypatch, caplog):
    real_replace = os.replace

    def other_job_first(source, destination):
        # Another job stores the same fingerprint between our staging and our rename.
        if Path(destination) == entry(FP1) and not entry(FP1).exists():
            monkeypatch.setattr(os, "replace", real_replace)
            store(FP1, {"kohya": "results/a/kohya.safetensors"})
        return real_replace(source, destination)

    monkeypatch.setattr(os, "replace", other_job_first)
    with caplog.at_level(logging.WARNING, logger="loramill"):
        store(FP1, outputs("a"))  # does not raise
    assert not caplog.records
    assert sorted(p.name for p in entry(FP1).iterdir()) == [COMPLETE, "kohya"]  # the other's
    assert [p.name for p in run_cache.RUNS.iterdir()] == [FP1]  # no staging left


def test_store_falls_back_to_copies(project, monkeypatch):
    real_link, calls = os.link, []

    def fail_once(source, destination, **kwargs):
        calls.append(source)
        if len(calls) == 1:
            raise OSError(18, "Invalid cross-device link")
        return real_link(source, destination, **kwargs)

    monkeypatch.setattr(os, "link", fail_once)
    store(FP1, outputs("a"))
    assert len(calls) == 2  # the folder's files; a file output is copied anyway
    first = entry(FP1) / "checkpoints" / os.path.relpath(calls[0], "results/a/checkpoints")
    assert first.stat().st_ino != Path(calls[0]).stat().st_ino  # a copy
    assert digest(first) == digest(calls[0])
    assert not first.stat().st_mode & stat.S_IWUSR
    assert restore(FP1, outputs("b"))


def test_store_never_raises(project, monkeypatch, caplog):
    def vanish(source, destination, **kwargs):
        os.unlink(source)  # the output disappears mid-way: no link, no copy possible
        raise FileNotFoundError(2, "No such file", source)

    monkeypatch.setattr(os, "link", vanish)
    with caplog.at_level(logging.WARNING, logger="loramill"):
        store(FP1, outputs("a"))
    assert "not stored" in caplog.text
    assert list(run_cache.RUNS.iterdir()) == []  # no entry, no staging
    monkeypatch.undo()
    store(FP2, {"weird/name": "results/a/kohya.safetensors"})  # a bad name: warned, no raise


def test_nonexistent_outputs_are_skipped(project):
    store(FP1, {"kohya": "results/a/kohya.safetensors", "tensorboard": "results/a/tb"})
    assert sorted(p.name for p in entry(FP1).iterdir()) == [COMPLETE, "kohya"]
    write_text("results/b/tb/events", "kept")
    assert restore(FP1, {"kohya": "results/b/k", "tensorboard": "results/b/tb"})
    assert Path("results/b/tb/events").read_text() == "kept"


def make_entry(fingerprint: str, size: int, last_used: float) -> None:
    path = Path(f"out/{fingerprint[:4]}.bin")
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"x" * size)
    store(fingerprint, {"model": str(path)})
    path.unlink()  # the output moved on: only the cache holds the data
    os.utime(entry(fingerprint), (last_used, last_used))


def test_gc_keeps_referenced_and_removes_least_recently_used(project):
    make_entry(FP1, 1000, last_used=100)  # oldest, but referenced
    make_entry(FP2, 1000, last_used=200)
    make_entry(FP3, 1000, last_used=300)
    report = gc(keep={FP1}, max_bytes=2500)
    assert report == GcReport(
        removed=1, freed_bytes=1000, kept=2, total_bytes=2000, cache_only_bytes=2000
    )
    assert sorted(p.name for p in run_cache.RUNS.iterdir()) == [FP1, FP3]
    assert gc(keep={FP1}, max_bytes=None).removed == 1
    assert [p.name for p in run_cache.RUNS.iterdir()] == [FP1]
    assert gc(keep=set(), max_bytes=0).total_bytes == 0


def test_gc_counts_shared_data_once(project):
    store(FP1, {"checkpoints": "results/a/checkpoints"})
    store(FP2, {"checkpoints": "results/a/checkpoints"})  # same inodes, another fingerprint
    report = gc(keep={FP1, FP2})
    size = len("weights 1") + len("{}")
    assert (report.total_bytes, report.cache_only_bytes) == (size, 0)  # the output links them
    report = gc(keep={FP1})
    assert (report.removed, report.freed_bytes, report.total_bytes) == (1, 0, size)
    shutil.rmtree("results/a/checkpoints")  # the output moved on: only the cache holds them
    assert gc(keep={FP1}).cache_only_bytes == size


def test_gc_sweeps_old_staging(project):
    old, fresh = run_cache.RUNS / f".staging-{FP1}-1-x", run_cache.RUNS / f".staging-{FP2}-1-y"
    for folder in (old, fresh):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub/file").write_text("partial")
        (folder / "sub").chmod(0o555)
    os.utime(old, (1000, 1000))
    gc(keep=set())
    assert not old.exists() and fresh.exists()


def test_store_prunes_over_the_cap(project, monkeypatch):
    monkeypatch.setenv(run_cache.MAX_GB_ENV, str(1500 / 2**30))
    write_text("locks/ds/train.json", json.dumps({"fingerprint": FP1}))
    make_entry(FP1, 1000, last_used=100)
    make_entry(FP2, 1000, last_used=200)  # the cache is over 1500 bytes: FP2 is stored...
    assert sorted(p.name for p in run_cache.RUNS.iterdir()) == [FP1, FP2]  # ...and kept
    make_entry(FP3, 1000, last_used=300)
    assert sorted(p.name for p in run_cache.RUNS.iterdir()) == [FP1, FP3]


def test_referenced_fingerprints_skips_broken_locks(project):
    write_text("locks/a/train.json", json.dumps({"fingerprint": FP1}))
    write_text("locks/b/resize.json", json.dumps({"fingerprint": FP2, "stage": "resize"}))
    write_text("locks/b/caption.json", "<<<<<<< HEAD")
    write_text("locks/c/train.json", "[]")
    assert run_cache.referenced_fingerprints() == {FP1, FP2}


def test_parse_size():
    assert parse_size("500M") == 500 * 2**20
    assert parse_size("20G") == 20 * 2**30
    assert parse_size("1.5g") == int(1.5 * 2**30)
    assert parse_size("123") == 123
    with pytest.raises(Exception, match="not a size"):
        parse_size("lots")


def test_make_gc(project):
    """The README's `make gc`, with this test environment's venv standing in for .venv."""
    write_text("locks/ds/train.json", json.dumps({"fingerprint": FP1}))
    for fingerprint in (FP1, FP2, FP3):
        make_entry(fingerprint, 2048, last_used=100)
    # grid cells: the one grids/ shows stays, the other goes
    shown, unused = "ab" * 32, "cd" * 32
    write_text("grids/ds.json", json.dumps({"cells": [{"key": shown}]}))
    for key in (shown, unused, "ef" * 32):
        write_text(f".cache/grid/{key[:2]}/{key}.png", "x" * 1024)
        if key != "ef" * 32:  # the third was just drawn: a grid job may be using it
            os.utime(f".cache/grid/{key[:2]}/{key}.png", (100, 100))
    shutil.copy(REPO / "Makefile", "Makefile")
    venv = Path(sys.executable).parent.parent
    result = subprocess.run(
        ["make", "--silent", "-o", f"{venv}/.installed", "gc", f"VENV={venv}"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert re.match(r"run-cache: removed 2 entries \(4\.0 KB\), kept 1 \(2\.0 KB", result.stdout), (
        result.stdout
    )
    assert [p.name for p in run_cache.RUNS.iterdir()] == [FP1]
    assert "grid cells: 1 removed (1.0 KB)" in result.stdout
    assert sorted(p.stem for p in Path(".cache/grid").rglob("*.png")) == [shown, "ef" * 32]
