"""A training job killed mid-run loses nothing: the rerun resumes from its saved state and
writes the adapter an uninterrupted run writes, bit for bit (real Snakemake, real SIGKILL)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, edit_config, run_tool

from loramill.models.checkpoint import read_checkpoint
from loramill.train.loop import train_lora

pytestmark = pytest.mark.workflow

DS = "wide_bands"
TARGET = f"results/{DS}/checkpoints"
STATES = ".cache/train/*/state/step-*.pt"


def train_steps(root: Path, steps: int) -> None:
    edit_config(root, lambda c: c["train"].update(max_train_steps=steps, save_steps=2))


def children(pid: int) -> list[int]:
    """Every descendant of a process, from /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        todo += kids
    return found


def train_job(pid: int) -> int | None:
    for child in children(pid):
        try:
            command = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b".snakemake/scripts" in command and b"train.py" in command:
            return child
    return None


def saved_step(state: Path) -> int:
    return int(state.stem.removeprefix("step-"))


def kill_after_new_state(root: Path, snakemake: subprocess.Popen, before: set[Path]) -> None:
    """SIGKILL the train job once it has saved a state of its own (past the build's)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert snakemake.poll() is None, "training finished before its first saved state"
        job = train_job(snakemake.pid)
        if job and set(root.glob(STATES)) - before:
            os.kill(job, signal.SIGKILL)  # what the OOM killer or a power cut does
            return
        time.sleep(0.02)
    raise AssertionError("no saved training state appeared")


@pytest.fixture(scope="module")
def killed(small_build, tmp_path_factory) -> tuple[Path, int]:
    """The session's small build, its training of DS continued for 100000 steps (hours
    here: it cannot end before the kill) and SIGKILLed once it has saved a state; the
    checkout and the step of that state."""
    root = tmp_path_factory.mktemp("resume") / "repo"
    shutil.copytree(small_build.built, root, symlinks=True)
    train_steps(root, 100_000)
    before = set(root.glob(STATES))
    snakemake = subprocess.Popen(
        [str(BIN / "snakemake"), "--cores", "1", TARGET],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    kill_after_new_state(root, snakemake, before)
    output = snakemake.communicate(timeout=120)[0].decode()
    assert snakemake.returncode != 0, output
    # Snakemake removed the failed job's outputs, as it always does.
    assert not (root / "results" / DS / "checkpoints").exists()
    saved = [saved_step(path) for path in set(root.glob(STATES)) - before]
    assert saved and min(saved) > 2 and min(saved) % 2 == 0, saved
    return root, max(saved)


def test_killed_training_resumes_to_the_same_adapter(killed, tmp_path):
    root, saved = killed
    # The rerun stops two steps past the saved state: a run of the same options (where they
    # stop is not part of a run's state, see loramill.train.state).
    train_steps(root, saved + 2)
    run_tool("snakemake", "--cores", "1", TARGET, cwd=root)
    log = (root / "logs" / "train" / f"{DS}.log").read_text()
    assert f"resumed from step {saved}\n" in log, log
    checkpoints = sorted((root / "results" / DS / "checkpoints").glob("*.safetensors"))
    assert len(checkpoints) == saved // 2 + 1

    # The uninterrupted run, in-process on the same prepared data with a cold cache.
    config = read_config(root)
    settings = {**config["train"]}
    torch.set_num_threads(settings["threads"])
    whole = train_lora(
        root / "results" / DS / "resized",
        root / "results" / DS / "captions.jsonl",
        tmp_path / "checkpoints",
        tmp_path / "tb",
        str(root / config["base_model"]),
        settings,
        trigger=config["datasets"][DS]["trigger"],
        device="cpu",
        cache_root=tmp_path / "cache",
    )
    assert len(whole) == len(checkpoints)
    expected, got = read_checkpoint(whole[-1]).tensors, read_checkpoint(checkpoints[-1]).tensors
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def read_config(root: Path) -> dict:
    import yaml

    return yaml.safe_load((root / "config" / "config.yaml").read_text())
