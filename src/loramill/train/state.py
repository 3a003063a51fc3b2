"""Training state kept outside Snakemake's declared outputs, so a failed or killed job loses
nothing and a longer run continues a shorter one.

Snakemake deletes a failed job's outputs, checkpoints included. The state therefore lives in
``.cache/train/<key>/``, where the key is the train stage's fingerprint without the options
that only decide where a run stops (``max_train_steps`` and ``save_steps``; for schedules that
depend on the total, only ``save_steps``). Runs that share a key follow the same trajectory
step for step, so their states are interchangeable:

    adapters/step-NNNNNN.safetensors   LoRA tensors at every checkpoint step (checkpoints are
                                       written from these, so none is lost to a crash)
    samples/step-NNNNNN-II.png         samples rendered during training (sample_every_n_steps)
    state/step-NNNNNN.pt               full state at the newest checkpoint step: optimizer,
                                       LR scheduler, grad scaler, every RNG, the data order
                                       and the loss history (older ones are pruned)

The full state is read with ``torch.load(weights_only=True)``: tensors and plain containers
only, never code.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from loramill.files import atomic_path, save_safetensors
from loramill.hashing import hash_value
from loramill.models.checkpoint import (
    AVERAGE_KEY,
    AVERAGE_PREFIX,
    STEP_NAME,
    STEP_PREFIX,
    SUFFIX,
    step_name,
)
from loramill.train.config import SAVING_OPTIONS, STOPPING_OPTIONS, TrainConfig
from loramill.train.ema import average_about

log = logging.getLogger(__name__)
STATE_ROOT = Path(".cache/train")
STATE_SUFFIX = ".pt"
STEP_FILE = re.compile(rf"{STEP_NAME.pattern}({re.escape(SUFFIX)}|{re.escape(STATE_SUFFIX)})$")
SAMPLE_FILE = re.compile(rf"{STEP_NAME.pattern}-\d+\.png$")


def trajectory_key(fingerprint: dict[str, Any], section: str, stops: tuple[str, ...]) -> str:
    """The trajectory a train job follows: its fingerprint less the options ``stops`` of its
    ``section`` param (a dotted path: ``text.train``), which only decide where the run stops."""
    trajectory = copy.deepcopy(fingerprint)
    options = trajectory.get("params", {})
    for key in section.split("."):
        options = options.get(key, {})
    for option in stops:
        options.pop(option, None)
    return hash_value(trajectory)


def state_key(fingerprint: dict[str, Any], cfg: TrainConfig) -> str:
    return trajectory_key(
        fingerprint, "train", STOPPING_OPTIONS if cfg.continues else SAVING_OPTIONS
    )


def state_dir(fingerprint: dict[str, Any], config: dict[str, Any]) -> Path:
    return STATE_ROOT / state_key(fingerprint, TrainConfig.from_dict(config))


class RunState:
    """One trajectory's folder of adapter snapshots and resumable states."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.adapters = self.folder / "adapters"
        self.states = self.folder / "state"
        self.samples = self.folder / "samples"  # PNGs rendered during training, kept

    @staticmethod
    def _steps(folder: Path) -> list[int]:
        if not folder.is_dir():
            return []
        found = (STEP_FILE.match(p.name) for p in folder.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def adapter_path(self, step: int) -> Path:
        return self.adapters / step_name(step)

    def state_path(self, step: int) -> Path:
        return self.states / step_name(step, STATE_SUFFIX)

    def resume_point(self, needed: list[int]) -> int:
        """The step to start from (0: from scratch) for a run that checkpoints at ``needed``.

        A saved state at step S serves if S is not past the run's end and every checkpoint
        the run writes up to S has its adapter snapshot. When every checkpoint is already
        there, the run has nothing left to train.
        """
        adapters, states, end = (
            set(self._steps(self.adapters)),
            self._steps(self.states),
            needed[-1],
        )
        if set(needed) <= adapters and any(step >= end for step in states):
            return end
        usable = [s for s in states if s <= end and all(n in adapters for n in needed if n <= s)]
        return max(usable, default=0)

    def average_path(self, step: int) -> Path:
        return self.adapters / (AVERAGE_PREFIX + step_name(step))

    def save(self, step: int, adapters: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
        """Snapshot the adapters (and train.ema's average), then the full state; then drop
        older full states."""
        save_safetensors(adapters, self.adapter_path(step))
        if state.get("ema") is not None:
            about = {AVERAGE_KEY: average_about(state["ema"])}
            save_safetensors(state["ema"]["tensors"], self.average_path(step), about)
        with atomic_path(self.state_path(step)) as tmp:
            torch.save(state, tmp)
        for older in self._steps(self.states):
            if older < step:
                self.state_path(older).unlink(missing_ok=True)

    def sample_files(self, up_to: int) -> list[Path]:
        """Samples rendered at steps up to ``up_to`` (``step-NNNNNN-II.png``)."""
        found = ((SAMPLE_FILE.match(p.name), p) for p in self.samples.glob(f"{STEP_PREFIX}*.png"))
        return sorted(p for match, p in found if match and int(match.group(1)) <= up_to)

    def load_adapters(self, step: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.adapter_path(step))

    def load_average(self, step: int) -> tuple[dict[str, torch.Tensor], str] | None:
        """train.ema's average snapshotted at ``step`` and what it is (None: none kept)."""
        from safetensors import safe_open

        if not self.average_path(step).is_file():
            return None
        with safe_open(str(self.average_path(step)), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
            return tensors, handle.metadata()[AVERAGE_KEY]

    def load_state(self, step: int) -> dict[str, Any]:
        """The full state saved at ``step``, or the newest later one (for its history only)."""
        chosen = min(s for s in self._steps(self.states) if s >= step)
        return torch.load(self.state_path(chosen), weights_only=True)

    def finish(self, keep: bool) -> None:
        """A finished run keeps what a longer run would continue from, or nothing."""
        if not keep:
            with contextlib.suppress(FileNotFoundError):
                shutil.rmtree(self.folder)
