"""What a training run shows while it runs and leaves behind: a tqdm progress bar (it/s,
loss, ETA) on the console and, every few percent, in the job log; TensorBoard scalars for the
loss (mean over gradient accumulation) and each parameter group's learning rate; and a loss
curve PNG for the report."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

from loramill.files import atomic_path

log = logging.getLogger(__name__)
LOG_LINES = 20  # progress lines per run in the job log


class Progress:
    def __init__(self, accelerator: Any, total: int, start: int, history: list[dict]) -> None:
        from tqdm.auto import tqdm

        self.accelerator = accelerator
        self.total = total
        self.history = list(history)
        interactive = sys.stderr.isatty()
        self.bar = tqdm(
            total=total,
            initial=start,
            unit="step",
            desc="train",
            file=sys.stderr,
            mininterval=1.0 if interactive else 30.0,
            dynamic_ncols=True,
        )
        self.every = max(1, total // LOG_LINES)
        # TensorBoard's own log was deleted with the failed job's outputs: write what came
        # before the resumed step again, with its step numbers.
        for record in self.history:
            self._log(record)

    def _log(self, record: dict[str, Any]) -> None:
        scalars = {"loss": record["loss"]} | {f"lr/{k}": v for k, v in record["lr"].items()}
        self.accelerator.log(scalars, step=record["step"])

    def update(self, step: int, loss: float, lrs: dict[str, float]) -> None:
        record = {"step": step, "loss": loss, "lr": lrs}
        self.history.append(record)
        self._log(record)
        self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        self.bar.update(1)
        if step % self.every == 0 or step == self.total:
            log.info("%s", self.bar)

    def close(self) -> None:
        self.bar.close()


def plot_loss(history: list[dict[str, Any]], path: str | os.PathLike, title: str) -> None:
    """Loss per step and its running mean, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    steps = [r["step"] for r in history]
    losses = [r["loss"] for r in history]
    window = max(1, len(losses) // 20)
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
        for i in range(len(losses))
    ]
    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.add_subplot()
    axes.plot(steps, losses, color="#9bb7d4", linewidth=0.8, label="loss")
    axes.plot(steps, smooth, color="#1f4e79", linewidth=1.6, label=f"mean of {window}")
    axes.set(xlabel="step", ylabel="loss", title=title)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})
