"""Units of the content-keyed mechanism: code dependencies, hash cache, reasons, run-cache."""

from __future__ import annotations

from loramill.freshness import explain, restore, store
from loramill.hashing import HashCache, hash_tree
from loramill.stages import STAGES, code_files


def names(stage):
    return {p.name for p in code_files(STAGES[stage].module)}


def test_code_dependencies_follow_imports():
    assert names("resize") == {"resize.py", "files.py"}
    # The grid renders through the kohya export: export code changes re-render grids.
    assert {"grid.py", "export.py", "lora.py", "model.py"} <= names("grid")
    assert "train.py" not in names("export")
    assert all("__init__.py" not in names(stage) for stage in STAGES)


def test_hash_cache_trusts_only_unchanged_files(tmp_path):
    (tmp_path / "d").mkdir()
    path = tmp_path / "d" / "a.txt"
    path.write_text("one")
    cache = HashCache(tmp_path / "hashes.sqlite")
    first = cache.tree(tmp_path / "d")
    cache.save()
    path.write_text("two")  # same size: only the mtime and content tell
    reopened = HashCache(tmp_path / "hashes.sqlite")
    assert reopened.tree(tmp_path / "d") != first
    assert reopened.digest(tmp_path / "d") == hash_tree(tmp_path / "d")


def test_reasons_are_in_the_users_terms():
    settings = {"path": "data/ds"}
    old = {
        "config": {"train": {"learning_rate": 1e-4, "rank": 4}},
        "code": {"train.py": "a"},
        "versions": {"torch": "2.13.0"},
        "base_model": "m",
        "inputs": {"data/ds/images/a.png": "1", "data/ds/captions/a.txt": "x"},
    }
    new = {
        "config": {"train": {"learning_rate": 2e-4, "rank": 4}},
        "code": {"train.py": "b"},
        "versions": {"torch": "2.14.0"},
        "base_model": "m",
        "inputs": {
            "data/ds/images/a.png": "2",
            "data/ds/images/b.png": "3",
            "data/ds/captions/a.txt": "y",
        },
    }
    assert explain(old, new, settings) == [
        "config train.learning_rate changed",
        "code changed (train.py)",
        "torch 2.13.0 → 2.14.0",
        "images changed (1 changed, 1 added)",
        "captions edited (1 image)",
    ]


def test_run_cache_restores_files_and_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder, single = tmp_path / "out" / "dir", tmp_path / "out" / "file.txt"
    folder.mkdir(parents=True)
    (folder / "x.bin").write_bytes(b"\x00\x01")
    single.write_text("result")
    store("f" * 64, ["out/dir", "out/file.txt"])
    single.unlink()
    (folder / "x.bin").write_bytes(b"changed")
    assert restore("f" * 64, ["out/dir", "out/file.txt"])
    assert single.read_text() == "result"
    assert (folder / "x.bin").read_bytes() == b"\x00\x01"
    assert not restore("e" * 64, ["out/file.txt"])
