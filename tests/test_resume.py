"""A training job killed mid-run loses nothing: the rerun resumes from its saved state and
writes the adapter an uninterrupted run writes, bit for bit (real Snakemake, real SIGKILL)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from conftest import BIN, clone_checkout, run_tool
from test_reruns import edit_config

from loramill.models.checkpoint import read_checkpoint
from loramill.train.loop import train_lora

pytestmark = pytest.mark.workflow

DS = "wide_bands"
TARGET = f"results/{DS}/checkpoints"
TRAIN = {"max_train_steps": 80, "save_steps": 20, "train_batch_size": 1}


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


def kill_after_first_state(root: Path, snakemake: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert snakemake.poll() is None, "training finished before the first saved state"
        job = train_job(snakemake.pid)
        if job and list((root / ".cache" / "train").glob("*/state/step-*.pt")):
            os.kill(job, signal.SIGKILL)  # what the OOM killer or a power cut does
            return
        time.sleep(0.02)
    raise AssertionError("no saved training state appeared")


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    root = clone_checkout(tmp_path_factory.mktemp("resume") / "repo")
    run_tool("dvc", "pull", cwd=root)
    edit_config(root, lambda c: c["train"].update(TRAIN))
    snakemake = subprocess.Popen(
        [str(BIN / "snakemake"), "--cores", "1", TARGET],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    kill_after_first_state(root, snakemake)
    output = snakemake.communicate(timeout=120)[0].decode()
    assert snakemake.returncode != 0, output
    # Snakemake removed the failed job's outputs, as it always does.
    assert not (root / "results" / DS / "checkpoints").exists()
    return root


def test_killed_training_resumes_to_the_same_adapter(killed, tmp_path):
    run_tool("snakemake", "--cores", "1", TARGET, cwd=killed)
    log = (killed / "logs" / "train" / f"{DS}.log").read_text()
    resumed = [line for line in log.splitlines() if "resumed from step" in line]
    assert resumed, log
    step = int(resumed[0].rsplit(" ", 1)[1])
    assert 20 <= step < TRAIN["max_train_steps"] and step % 20 == 0
    checkpoints = sorted((killed / "results" / DS / "checkpoints").glob("*.safetensors"))
    assert len(checkpoints) == TRAIN["max_train_steps"] // TRAIN["save_steps"]

    # The uninterrupted run, in-process on the same prepared data with a cold cache.
    settings = {**read_config(killed)["train"]}
    torch.set_num_threads(settings["threads"])
    whole = train_lora(
        killed / "results" / DS / "resized",
        killed / "results" / DS / "captions.jsonl",
        tmp_path / "checkpoints",
        tmp_path / "tb",
        str(killed / read_config(killed)["base_model"]),
        settings,
        trigger=read_config(killed)["datasets"][DS]["trigger"],
        device="cpu",
        cache_root=tmp_path / "cache",
    )
    expected, got = read_checkpoint(whole[-1]).tensors, read_checkpoint(checkpoints[-1]).tensors
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def read_config(root: Path) -> dict:
    import yaml

    return yaml.safe_load((root / "config" / "config.yaml").read_text())
