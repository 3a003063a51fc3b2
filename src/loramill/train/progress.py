"""What a training run shows while it runs and leaves behind: a tqdm progress bar (it/s,
loss, ETA) on a terminal and, every few percent, a progress line in the job log (and on the
console, above the bar); TensorBoard scalars for the loss (mean over gradient accumulation) and
each parameter group's learning rate; and a loss curve PNG for the report."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

from loramill.files import atomic_path

log = logging.getLogger(__name__)
LOG_LINES = 20  # progress lines per run in the job log


class Progress:
    def __init__(self, accelerator: Any, total: int, start: int, history: list[dict]) -> None:
        self.accelerator = accelerator
        self.total, self.start, self.started = total, start, time.monotonic()
        self.history = list(history)
        self.every = max(1, total // LOG_LINES)
        self.console = ExitStack()
        # A bar redraws its line in place, which only a terminal shows as one line; in a pipe
        # or a file (a cluster job's log, CI) it would glue onto the log lines around it.
        self.bar = self._bar() if sys.stderr.isatty() else None
        # TensorBoard's own log was deleted with the failed job's outputs: write what came
        # before the resumed step again, with its step numbers.
        for record in self.history:
            self._log(record)

    def _bar(self) -> Any:
        from tqdm.auto import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        # While the bar is up, console log lines (ours, a library's warning) are written
        # above it, the bar cleared and redrawn, instead of after it on its line.
        self.console.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        return tqdm(
            total=self.total,
            initial=self.start,
            unit="step",
            desc="train",
            file=sys.stderr,
            mininterval=1.0,
            dynamic_ncols=True,
        )

    def _log(self, record: dict[str, Any]) -> None:
        scalars = {"loss": record["loss"]} | {f"lr/{k}": v for k, v in record["lr"].items()}
        self.accelerator.log(scalars, step=record["step"])

    def line(self, step: int, loss: float) -> str:
        """The progress line the log gets: the bar's text, rate averaged over this run."""
        from tqdm import tqdm

        elapsed = time.monotonic() - self.started
        return tqdm.format_meter(
            step,
            self.total,
            elapsed,
            prefix="train",
            unit="step",
            initial=self.start,
            postfix=f"loss={loss:.4f}",
        )

    def update(self, step: int, loss: float, lrs: dict[str, float]) -> None:
        record = {"step": step, "loss": loss, "lr": lrs}
        self.history.append(record)
        self._log(record)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
            self.bar.update(1)
        if step % self.every == 0 or step == self.total:
            log.info("%s", self.line(step, loss))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.console.close()


SMOOTHING_SPAN = 0.1  # the EMA averages over about this fraction of the run's steps


def ema(values: Sequence[float], weight: float) -> list[float]:
    """Exponential moving average, bias-corrected as TensorBoard's smoothing is: the average
    starts at 0, so each value is divided by the weight the real values carry in it
    (1 - weight**n), else the first steps would be pulled towards 0."""
    smoothed, average = [], 0.0
    for n, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**n))
    return smoothed


@dataclass(frozen=True)
class LossCurve:
    """What the loss plot draws: the raw per-step loss (faint), its EMA and a marker on the
    EMA at each saved checkpoint, so the eye finds the trend and what each checkpoint holds."""

    steps: list[int]
    raw: list[float]
    smooth: list[float]
    weight: float
    checkpoints: list[tuple[int, float]]  # (step, smoothed loss there)
    ylim: tuple[float, float]


def loss_curve(history: Sequence[dict[str, Any]], checkpoints: Iterable[int] = ()) -> LossCurve:
    """The curve of ``history`` (records with ``step`` and ``loss``); ``checkpoints``: the steps
    whose checkpoint was saved (a step not in the history is left out)."""
    steps = [int(r["step"]) for r in history]
    raw = [float(r["loss"]) for r in history]
    weight = 1 - 1 / max(1.0, SMOOTHING_SPAN * len(raw))
    smooth = ema(raw, weight)
    at = {step: i for i, step in enumerate(steps)}
    marked = [(s, smooth[at[s]]) for s in sorted(set(checkpoints)) if s in at]
    return LossCurve(steps, raw, smooth, weight, marked, _ylim(raw, smooth))


def _ylim(raw: list[float], smooth: list[float]) -> tuple[float, float]:
    """The y range: all of the smoothed curve and the middle of the raw spread. Per-step
    diffusion losses scatter over an order of magnitude (the noise level is drawn per step);
    scaled to their extremes, a trend of a few percent looks flat."""
    if not raw:
        return 0.0, 1.0
    ordered = sorted(raw)
    low = min(min(smooth), ordered[len(ordered) // 20])
    high = max(max(smooth), ordered[-1 - len(ordered) // 20])
    margin = (high - low) * 0.05 or abs(high) * 0.05 or 1.0
    return low - margin, high + margin


def loss_figure(curve: LossCurve, title: str) -> Any:
    """The matplotlib Figure of ``curve``."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.add_subplot()
    axes.plot(curve.steps, curve.raw, color="#9bb7d4", linewidth=0.6, alpha=0.6, label="loss")
    axes.plot(curve.steps, curve.smooth, color="#1f4e79", linewidth=2.0,
              label=f"EMA (smoothing {curve.weight:.2f})")  # fmt: skip
    if curve.checkpoints:
        marked_steps, marked_losses = zip(*curve.checkpoints, strict=True)
        for step in marked_steps:
            axes.axvline(step, color="#c0504d", linewidth=0.8, linestyle=":", alpha=0.7)
        axes.plot(marked_steps, marked_losses, linestyle="none", marker="o", markersize=6,
                  color="#c0504d", label="checkpoint saved")  # fmt: skip
    axes.set(xlabel="step", ylabel="loss", title=title, ylim=curve.ylim)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    return figure


def plot_loss(
    history: list[dict[str, Any]],
    path: str | os.PathLike,
    title: str,
    checkpoints: Iterable[int] = (),
) -> None:
    """The loss curve (loss_curve, loss_figure) as a PNG; ``checkpoints``: the saved steps."""
    import matplotlib

    matplotlib.use("Agg")
    figure = loss_figure(loss_curve(history, checkpoints), title)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})
