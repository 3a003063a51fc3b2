"""An exponential moving average of the adapter (issue #32's EMA): its checkpoints follow the
recurrence exactly, a resumed run keeps it exactly, and the export can ship it, saying so."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import crash_and_resume, digest, train, train_logged

from loramill.models.checkpoint import AVERAGE_KEY, list_checkpoints, read_checkpoint

EMA = {"ema": True, "ema_decay": 0.75, "save_steps": 1, "max_train_steps": 3}


def tensors(path):
    return read_checkpoint(path).tensors


@pytest.mark.parametrize("interval", [1, 2])
def test_the_average_is_the_recurrence_over_the_trained_weights(
    prepared, tiny_sd, tmp_path, interval
):
    """average_k = d · average_(k-1) + (1 - d) · weights_k at every interval-th step (the
    closed form d^k θ0 + Σ (1 - d) d^(k-i) θ_i), and unchanged between them; the first
    average is the start's, folded once or (interval 2) not at all."""
    written = train(prepared, tmp_path, tiny_sd, ema_update_step_interval=interval, **EMA)
    averages = list_checkpoints(tmp_path / "checkpoints", average=True)
    assert [p.name for p in averages] == [f"ema-{p.name}" for p in written]
    weights = [tensors(p) for p in written]
    means = [tensors(p) for p in averages]
    d = 0.75
    for step in (2, 3):
        previous, now, trained = means[step - 2], means[step - 1], weights[step - 1]
        for key, value in now.items():
            expected = previous[key]
            if step % interval == 0:
                expected = previous[key] * d + trained[key] * (1 - d)
            torch.testing.assert_close(value, expected, rtol=1e-6, atol=1e-7)
    moved = [key for key in means[-1] if not torch.equal(means[-1][key], weights[-1][key])]
    assert moved  # the average is not the weights
    about = json.loads(read_checkpoint(averages[-1]).metadata[AVERAGE_KEY])
    assert about == {"decay": 0.75, "update_step_interval": interval, "steps": 3}


def test_a_resumed_run_keeps_the_average_exactly(prepared, tiny_sd, tmp_path, caplog, monkeypatch):
    config = {**EMA, "max_train_steps": 6, "save_steps": 2}
    resumed, lines = crash_and_resume(prepared, tmp_path, tiny_sd, caplog, monkeypatch, config)
    assert "resumed from step 4" in lines
    whole, _ = train_logged(prepared, tmp_path / "whole", tiny_sd, caplog, config)
    assert [digest(p) for p in resumed] == [digest(p) for p in whole]
    folders = (tmp_path / "resumed" / "checkpoints", tmp_path / "whole" / "checkpoints")
    again, once = (list_checkpoints(f, average=True) for f in folders)
    assert [p.name for p in again] == [p.name for p in once] and len(once) == 3
    assert [digest(p) for p in again] == [digest(p) for p in once]


def test_the_export_ships_the_average_when_asked(prepared, tiny_sd, tmp_path):
    from loramill.export.job import export_and_verify

    train(prepared, tmp_path, tiny_sd, **EMA)
    out = tmp_path / "exports"
    paths = [out / "x.safetensors", out / "x.diffusers.safetensors", out / "x.md", out / "s"]
    train_config = {"rank": 4, "alpha": 2, **EMA}
    export_and_verify(tmp_path / "checkpoints", *paths, "x", {"save_precision": "fp32",
                      "use_ema": True}, tiny_sd, False, train_config)  # fmt: skip
    metadata = read_checkpoint(paths[0]).metadata
    assert json.loads(metadata["loramill.ema"])["decay"] == 0.75
    steps = sorted(p.name for p in paths[3].iterdir())
    assert steps == ["x-000001.safetensors", "x-000002.safetensors", "x-000003.safetensors"]
    average = read_checkpoint(tmp_path / "checkpoints" / "ema-step-000003.safetensors")
    assert metadata["sshs_model_hash"] != read_checkpoint(
        tmp_path / "checkpoints" / "step-000003.safetensors"
    ).metadata.get("sshs_model_hash")
    assert average.metadata["loramill.step"] == metadata["loramill.step"] == "3"
    card = paths[2].read_text()
    assert "moving average of its weights (decay 0.75, updated every step)" in card
