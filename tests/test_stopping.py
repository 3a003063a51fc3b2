"""A training asked to stop (SIGINT, SIGTERM, its scheduler gone) stops at the next step
boundary with its state saved there, and the rerun resumes to the adapter an uninterrupted run
writes, bit for bit. In-process on the random tiny model; the same through real Snakemake is
in test_reruns.py (test_interrupted_training_…)."""

from __future__ import annotations

import os
import signal

import pytest
import torch
from conftest import train
from safetensors.torch import load_file

from loramill.train.step import Training
from loramill.train.stopping import Interrupted, StopRequest

CONFIG = {"max_train_steps": 6, "save_steps": 4, "train_batch_size": 1, "threads": 1}


@pytest.fixture
def signal_at_step(monkeypatch):
    """Send ``number`` to this process during training step ``at``."""

    def arrange(number: int, at: int) -> None:
        step, calls = Training.step, []

        def stepping(self):
            calls.append(1)
            if len(calls) == at:
                os.kill(os.getpid(), number)
            return step(self)

        monkeypatch.setattr(Training, "step", stepping)

    return arrange


@pytest.mark.parametrize("number", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_stops_at_the_step_boundary_and_the_rerun_resumes_exactly(
    prepared, tmp_path, tiny_sd, signal_at_step, monkeypatch, number
):
    state = tmp_path / "state"
    signal_at_step(number, at=3)
    with pytest.raises(Interrupted) as stopped:
        train(prepared, tmp_path / "a", tiny_sd, call={"state_dir": state}, **CONFIG)
    name = signal.Signals(number).name
    assert str(stopped.value) == (
        f"interrupted ({name}): state saved at step 3; rerun the same command to resume"
    )
    assert sorted(p.name for p in (state / "state").iterdir()) == ["step-000003.pt"]

    monkeypatch.undo()
    resumed = train(prepared, tmp_path / "b", tiny_sd, call={"state_dir": state}, **CONFIG)
    straight = train(prepared, tmp_path / "c", tiny_sd, **CONFIG)
    assert [p.name for p in resumed] == ["step-000004.safetensors", "step-000006.safetensors"]
    for a, b in zip(resumed, straight, strict=True):
        expected, got = load_file(str(b)), load_file(str(a))
        assert all(torch.equal(expected[k], got[k]) for k in expected)


def test_the_handlers_before_are_back_after_training(prepared, tmp_path, tiny_sd):
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    train(prepared, tmp_path / "a", tiny_sd, max_train_steps=1, save_steps=1, threads=1)
    assert {number: signal.getsignal(number) for number in before} == before


def test_a_second_signal_after_the_grace_time_stops_at_once(monkeypatch):
    monkeypatch.setattr("loramill.train.stopping.REPEAT_SECONDS", 0.0)
    with StopRequest() as stop, pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
        assert stop.requested() == "SIGINT"  # the first only asks
        signal.raise_signal(signal.SIGINT)


def test_one_signal_twice_within_the_grace_time_is_one_request():
    with StopRequest() as stop:
        signal.raise_signal(signal.SIGINT)  # from the terminal
        signal.raise_signal(signal.SIGINT)  # and again, passed on by Snakemake
        assert stop.requested() == "SIGINT"


def test_a_parent_process_gone_is_a_request_to_stop(monkeypatch):
    chain = [[(10, 1.0), (1, 0.0)], [(10, 1.0), (1, 0.0)], [(1, 0.0)]]
    monkeypatch.setattr("loramill.train.stopping._ancestors", lambda: chain.pop(0))
    monkeypatch.setattr("loramill.train.stopping.PARENT_CHECK_SECONDS", 0.0)
    with StopRequest() as stop:
        assert stop.requested() is None
        assert stop.requested() == "its scheduler exited"
