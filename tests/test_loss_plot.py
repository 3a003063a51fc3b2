"""The loss curve of the report (results/<ds>/loss.png, adapter_loss.png): a smoothed trend
over the faint per-step loss, with the saved checkpoints marked on it."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import pytest
from conftest import train

from loramill.train import progress as train_log
from loramill.train.progress import ema, loss_curve, loss_figure

TINY_LLAMA = str(Path(__file__).resolve().parents[1] / "models" / "tiny-llama")


def noisy_decreasing(n: int, seed: int = 0) -> tuple[list[float], list[float]]:
    """A diffusion-like loss: a slow exponential decay under heavy multiplicative noise."""
    rng = random.Random(seed)
    trend = [0.1 + 0.1 * math.exp(-3 * i / n) for i in range(n)]
    return trend, [t * rng.uniform(0.1, 1.9) for t in trend]  # noise of mean 1


def test_ema_is_bias_corrected():
    # weight 0.5: averages 0.5, 1.25, 2.125 over weights 0.5, 0.75, 0.875
    assert ema([1.0, 2.0, 3.0], 0.5) == pytest.approx([1.0, 5 / 3, 2.125 / 0.875])
    # a constant series is that constant from the first step: no pull towards 0
    assert ema([4.0] * 10, 0.9) == pytest.approx([4.0] * 10)
    assert ema([1.0, 7.0], 0.0) == [1.0, 7.0]  # no smoothing


def test_smoothed_noisy_loss_shows_the_trend():
    trend, raw = noisy_decreasing(400)
    history = [{"step": s, "loss": v} for s, v in enumerate(raw, start=1)]
    curve = loss_curve(history)
    assert curve.steps == list(range(1, 401)) and curve.raw == raw
    assert curve.smooth == pytest.approx(ema(raw, curve.weight))
    assert 0.9 < curve.weight < 1  # averages over tens of steps
    # past the EMA's warm-up the curve falls like the trend: every 40-step stretch lower than
    # the one before, where the raw loss goes up and down by more than the whole decrease
    stretches = [sum(curve.smooth[i : i + 40]) / 40 for i in range(40, 400, 40)]
    assert all(b < a for a, b in itertools.pairwise(stretches)), stretches
    rises = sum(b > a for a, b in itertools.pairwise(raw))
    assert rises > 150
    error = lambda values: sum((v - t) ** 2 for v, t in zip(values, trend, strict=True))  # noqa: E731
    assert error(curve.smooth) < error(raw) / 5
    # the y range shows the smoothed curve whole and is not stretched to the raw extremes
    low, high = curve.ylim
    assert low < min(curve.smooth) and max(curve.smooth) < high < max(raw)


def test_checkpoints_are_marked_on_the_smoothed_curve():
    _, raw = noisy_decreasing(60)
    history = [{"step": s, "loss": v} for s, v in enumerate(raw, start=1)]
    curve = loss_curve(history, checkpoints=[40, 20, 60, 80])  # 80: not reached
    assert curve.checkpoints == [(20, curve.smooth[19]), (40, curve.smooth[39]),
                                 (60, curve.smooth[59])]  # fmt: skip
    figure = loss_figure(curve, "training loss")
    (axes,) = figure.axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    marked = lines["checkpoint saved"]
    assert list(marked.get_xdata()) == [20, 40, 60]
    assert list(marked.get_ydata()) == [loss for _, loss in curve.checkpoints]
    assert list(lines["loss"].get_ydata()) == raw
    assert lines["loss"].get_alpha() < 1  # the raw loss faint, under the trend
    (smoothed,) = (line for label, line in lines.items() if label.startswith("EMA"))
    assert list(smoothed.get_ydata()) == curve.smooth
    assert axes.get_ylim() == pytest.approx(curve.ylim)


@pytest.fixture
def drawn(monkeypatch):
    """The curves plot_loss hands to matplotlib."""
    curves = []
    figure = train_log.loss_figure

    def spy(curve, title):
        curves.append(curve)
        return figure(curve, title)

    monkeypatch.setattr(train_log, "loss_figure", spy)
    return curves


def test_training_marks_its_save_steps(prepared, tmp_path, tiny_sd, drawn):
    # TRAIN_CONFIG: 6 steps, save_steps 4: checkpoints at 4 and at the last step
    train(prepared, tmp_path, tiny_sd, call={"loss_png": tmp_path / "loss.png"})
    (curve,) = drawn
    assert curve.steps == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in curve.checkpoints] == [4, 6]
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_text_training_marks_its_save_steps(tmp_path, drawn):
    from loramill.demo.text import procedure_records
    from loramill.text.language_model import load_tokenizer
    from loramill.text.prepare import write_tokens
    from loramill.text.records import parse_record, tokenize
    from loramill.text.train import train_text

    lines = [json.dumps(r) for r in procedure_records(8)]
    records = [parse_record(line, f"demo:{n}") for n, line in enumerate(lines, start=1)]
    tokens = tokenize(records, load_tokenizer(TINY_LLAMA), 64, "truncate", True)
    write_tokens(tokens, tmp_path / "train.jsonl")
    config = {"lora_rank": 4, "max_train_steps": 5, "save_steps": 2, "train_batch_size": 4}
    loss_png = tmp_path / "adapter_loss.png"
    train_text(str(tmp_path / "train.jsonl"), str(tmp_path / "adapters"), str(loss_png),
               TINY_LLAMA, config, device="cpu")  # fmt: skip
    (curve,) = drawn
    assert curve.steps == [1, 2, 3, 4, 5]
    assert [step for step, _ in curve.checkpoints] == [2, 4, 5]
    assert loss_png.stat().st_size > 0
