"""An exponential moving average of the adapter being trained (``train.ema``), as OneTrainer
and SimpleTuner keep one: after every ``ema_update_step_interval``-th optimizer step,
average ← decay · average + (1 − decay) · weights, over every trained tensor (LoRA's pairs,
LoHa's and LoKr's factors, DoRA's magnitudes).

The average is kept in float32, on the training device or (``ema_device: cpu``) in main
memory, and saved in the run's state, so a resumed run continues it exactly. Each checkpoint
step also writes it as ``ema-step-NNNNNN.safetensors`` (the checkpoint format, read by
``export.use_ema``), made by putting the average into the layers for the moment of writing:
the adapter's own serialisation names its tensors.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch

from loramill.models.checkpoint import load_network_state, network_state


class AdapterAverage:
    """The moving average of the trained parameters of ``models`` (component → model)."""

    def __init__(self, models: dict[str, Any], decay: float, interval: int, device: str) -> None:
        self.decay, self.interval = decay, interval
        self.params = [
            p for name in sorted(models) for p in models[name].parameters() if p.requires_grad
        ]
        where = "cpu" if device == "cpu" else None
        self.average = [p.detach().to(where or p.device, torch.float32, copy=True)
                        for p in self.params]  # fmt: skip
        self.steps = 0  # optimizer steps seen
        self.settings = {"decay": decay, "update_step_interval": interval}

    def update(self) -> None:
        """After an optimizer step: fold the weights in, every interval."""
        self.steps += 1
        if self.steps % self.interval:
            return
        with torch.no_grad():
            for average, param in zip(self.average, self.params, strict=True):
                average.mul_(self.decay).add_(param.detach().to(average), alpha=1 - self.decay)

    @contextlib.contextmanager
    def _swapped(self) -> Iterator[None]:
        """The layers' weights kept for the block and put back after it, bit for bit."""
        kept = [param.detach().clone() for param in self.params]
        try:
            yield
        finally:
            with torch.no_grad():
                for weight, param in zip(kept, self.params, strict=True):
                    param.copy_(weight)

    def tensors(self, models: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The average as a checkpoint's tensors (models.checkpoint.network_state keys):
        put into the layers (``models``: unwrapped) for the moment of reading them."""
        with self._swapped(), torch.no_grad():
            for average, param in zip(self.average, self.params, strict=True):
                param.copy_(average.to(param))
            # copies: on the CPU the state's tensors share the layers' storage, which the
            # weights take back at the end of the block
            return {key: value.clone() for key, value in network_state(models)[0].items()}

    def state(self, models: dict[str, Any]) -> dict[str, Any]:
        """What the run's state keeps: the steps seen and the average as checkpoint tensors
        (the state's checkpoint-step EMA files are written from them on resume)."""
        return {"steps": self.steps, "tensors": self.tensors(models), **self.settings}

    def restore(self, models: dict[str, Any], saved: dict[str, Any]) -> None:
        """The average of a saved state, read through the layers as a checkpoint is."""
        self.steps = saved["steps"]
        with self._swapped(), torch.no_grad():
            load_network_state(models, saved["tensors"])
            for average, param in zip(self.average, self.params, strict=True):
                average.copy_(param.detach())


def average_about(state: dict[str, Any]) -> str:
    """What an average is, for its checkpoint's metadata (``loramill.ema``): its decay, update
    interval and the optimizer steps it has seen, as JSON."""
    return json.dumps({k: state[k] for k in ("decay", "update_step_interval", "steps")})
