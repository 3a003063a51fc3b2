"""What the console shows (issue #25, item 11): training's progress bar and its log lines on
lines of their own, and the planner saying what it restored from the run-cache."""

from __future__ import annotations

import io
import logging
import re
import sys
from pathlib import Path

import pytest

from loramill.hashing import HashCache
from loramill.reruns import run_cache
from loramill.reruns.fingerprints import Job, components, fingerprint
from loramill.reruns.locks import write_lock
from loramill.reruns.runner import FORMAT
from loramill.reruns.staleness import Planner, Stage, digests
from loramill.train.progress import Progress

LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ INFO loramill\.train\.progress: train: ")


class Terminal(io.StringIO):
    """A stderr that says it is a terminal, as a job's stderr is under an interactive
    `snakemake` (Snakemake jobs inherit it)."""

    def isatty(self) -> bool:
        return True


class Tracker:
    """Stands in for accelerate's Accelerator: Progress only sends it scalars."""

    def __init__(self) -> None:
        self.logged: list[int] = []

    def log(self, scalars: dict, step: int) -> None:
        self.logged.append(step)


def screen(text: str) -> list[str]:
    """The rows a terminal ends up showing: each carriage return goes back to the start of
    the row and overwrites it from there."""
    rows = []
    for row in text.split("\n"):
        shown = ""
        for part in row.split("\r"):
            shown = part + shown[len(part) :]
        rows.append(shown.rstrip())
    return rows


def run_progress(monkeypatch, stream: io.StringIO, total: int = 40) -> list[str]:
    """A training's progress (no training: Progress is fed losses) with the job's console
    logging (loramill.reruns.runner.setup_logging) writing to ``stream``; the rows it shows."""
    monkeypatch.setattr(sys, "stderr", stream)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.INFO)  # not the attribute: setLevel clears loggers' cached verdicts
    root.addHandler(console)
    try:
        progress = Progress(Tracker(), total, 0, [])
        for step in range(1, total + 1):
            progress.update(step, 1.0 / step, {"unet": 1e-4})
        progress.close()
    finally:
        root.removeHandler(console)
        root.setLevel(level)
    return screen(stream.getvalue())


@pytest.mark.parametrize("stream", [Terminal, io.StringIO], ids=["terminal", "pipe"])
def test_progress_log_lines_start_their_own_rows(monkeypatch, stream):
    rows = run_progress(monkeypatch, stream())
    logged = [row for row in rows if "INFO" in row]
    assert len(logged) == 20  # every 5 %
    assert all(LOG_LINE.match(row) for row in logged), logged
    assert "40/40" in logged[-1] and "loss=0.0250" in logged[-1]
    if stream is Terminal:  # the bar stays, on its own row, below the log lines
        assert re.match(r"^train: 100%\|.{10}\| 40/40 .*loss=0\.0250\]$", rows[-2])
        assert all("INFO" not in row for row in rows if row.startswith("train:"))
    else:  # no bar: what a file or a pipe gets is the log lines alone
        assert stream().isatty() is False
        assert [row for row in rows if row] == logged


# ---------------------------------------------------------------- restored at planning time


@pytest.fixture
def workdir(tmp_path, monkeypatch) -> Path:
    """A workflow folder with one stage, `train`, reading a shared input file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "scripts").mkdir()
    (tmp_path / "scripts" / "train.py").write_text("print('trained')\n")
    (tmp_path / "inputs.txt").write_text("the same inputs\n")
    return tmp_path


def stage() -> Stage:
    def job(ds: str) -> Job:
        return Job("train", Path("scripts/train.py"), {"steps": 2}, {"data": ["inputs.txt"]}, ".")

    return Stage("train", job, lambda ds: {"adapter": f"results/{ds}/adapter.bin"})


def build(ds: str, hashes: HashCache) -> bytes:
    """What a train job leaves (loramill.reruns.runner.run_keyed): its output, the run-cache
    entry and the lock."""
    present = lambda name, path: hashes.digest(path)  # noqa: E731  (the job hashes what it got)
    parts = components(stage().job(ds), present, hashes)
    outputs = stage().outputs(ds)
    Path(outputs["adapter"]).parent.mkdir(parents=True)
    Path(outputs["adapter"]).write_bytes(b"weights of " + ds.encode())
    run_cache.store(fingerprint(parts), outputs)
    write_lock(ds, "train", fingerprint(parts), parts, digests(outputs, hashes))
    return Path(outputs["adapter"]).read_bytes()


def planned(ds: str, hashes: HashCache, caplog) -> tuple[bool, list[str]]:
    """Whether the stage is fresh for ``ds``, and the lines the planner printed."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="loramill"):
        verdicts = Planner([stage()], hashes, set()).plan(ds)
    return verdicts["train"].fresh, [r.getMessage() for r in caplog.records]


def test_renamed_dataset_says_what_it_restored(workdir, caplog):
    hashes = HashCache(workdir / "hashes.sqlite")
    built = build("old_name", hashes)
    fresh, lines = planned("new_name", hashes, caplog)
    assert fresh
    assert (workdir / "results/new_name/adapter.bin").read_bytes() == built
    restored = [line for line in lines if line.startswith("restored:")]
    assert restored == [
        "restored: train new_name from the run-cache (same inputs as old_name): "
        "results/new_name/adapter.bin"
    ]


def test_removed_output_says_what_it_restored(workdir, caplog):
    hashes = HashCache(workdir / "hashes.sqlite")
    built = build("ds", hashes)
    assert planned("ds", hashes, caplog) == (True, [])  # nothing restored, nothing said
    (workdir / "results/ds/adapter.bin").unlink()
    fresh, lines = planned("ds", hashes, caplog)
    assert fresh
    assert (workdir / "results/ds/adapter.bin").read_bytes() == built
    assert lines == [
        "restored: train ds from the run-cache (outputs were missing): results/ds/adapter.bin"
    ]
