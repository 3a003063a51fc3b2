"""Which device a model stage runs on: ``device: auto | cpu | cuda`` in the config.

``auto`` takes CUDA when torch sees a GPU and the CPU otherwise, the choice accelerate makes.
Asking for CUDA on a machine without one is a one-line error, never a silent CPU run.
"""

from __future__ import annotations

from typing import Any

from loramill import LoramillError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(spec: str = "auto") -> Any:
    """The ``torch.device`` a stage should use."""
    import torch

    if spec not in DEVICES:
        raise LoramillError(f"device '{spec}': expected one of {', '.join(DEVICES)}")
    if spec == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if spec == "cuda":
        raise LoramillError("device 'cuda': torch sees no CUDA GPU on this machine")
    return torch.device("cpu")


def uses_gpu(spec: str) -> bool:
    """Whether a job with this setting may take a GPU (for Snakemake's ``gpu`` resource)."""
    return spec != "cpu"
