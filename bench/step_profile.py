"""One training step under torch.profiler, by operator and by module (issue #28).

Used by bench/train_real_size.py's child (loramill's Training.step) and bench/kohya_runner.py
(kohya's step, in kohya's own environment): it needs torch only. Forward time is attributed to
the UNet's building blocks by class name (hooks around each call, so nested classes — an
attention inside a transformer block — are counted in both), backward and optimizer time shows
in the operator table.
"""

from __future__ import annotations

import time
from collections import defaultdict
from itertools import pairwise
from pathlib import Path

import torch

# Both UNets (diffusers' and kohya's library/original_unet.py) name their blocks alike.
BLOCKS = (
    "Transformer2DModel", "BasicTransformerBlock", "Attention", "CrossAttention", "FeedForward",
    "ResnetBlock2D", "Downsample2D", "Upsample2D", "TimestepEmbedding",
)  # fmt: skip


class StepProfile:
    """start() before a step, stop() after it; writes the report to ``out``."""

    def __init__(self, model: torch.nn.Module, out: Path, label: str) -> None:
        self.model, self.out, self.label = model, Path(out), label
        self.forward: dict[str, list[float]] = defaultdict(list)
        self.marks: list[tuple[str, float]] = []  # (phase that starts, when)
        self.hooks: list = []
        self.profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True
        )

    def _hook(self, module: torch.nn.Module, name: str) -> None:
        started: list[float] = []

        def before(*_args: object) -> None:
            started.append(time.perf_counter())

        def after(*_args: object) -> None:
            self.forward[name].append(time.perf_counter() - started.pop())

        self.hooks += [
            module.register_forward_pre_hook(before),
            module.register_forward_hook(after),
        ]

    def start(self) -> None:
        for module in self.model.modules():
            kind = type(module).__name__
            if kind in BLOCKS:
                self._hook(module, kind)
        self.hooks.append(self.model.register_forward_pre_hook(lambda *_: self._mark("forward")))
        self.hooks.append(self.model.register_forward_hook(lambda *_: self._mark("backward+")))
        self.profiler.start()
        self._mark("start")  # after the profiler's own start-up

    def _mark(self, name: str) -> None:
        self.marks.append((name, time.perf_counter()))

    def stop(self) -> None:
        self.profiler.stop()
        self._mark("end")
        for hook in self.hooks:
            hook.remove()
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(self.report())

    def report(self) -> str:
        total = self.marks[-1][1] - self.marks[0][1]
        phases = [f"  {a}: {t2 - t1:.3f} s" for (a, t1), (_, t2) in pairwise(self.marks)]
        lines = [f"{self.label}: one step, {total:.3f} s (profiled)", "phases:", *phases]
        lines.append("forward by block class (calls, s; nested classes counted in each):")
        for kind, times in sorted(self.forward.items(), key=lambda kv: -sum(kv[1])):
            lines.append(f"  {kind:<24}{len(times):>5}{sum(times):>9.3f}")
        averages = self.profiler.key_averages()
        table = averages.table(sort_by="self_cpu_time_total", row_limit=40)
        shapes = self.profiler.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=60, max_shapes_column_width=80
        )
        return "\n".join(
            [*lines, "operators by self CPU time:", table, "the same by input shapes:", shapes]
        )
