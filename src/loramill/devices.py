"""Which device a model stage runs on: ``device: auto | cpu | cuda`` in the config.

``auto`` takes CUDA when torch sees a GPU and the CPU otherwise, the choice accelerate makes.
Asking for CUDA on a machine without one is a one-line error, never a silent CPU run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def on_device(modules: list[Any], device: Any) -> Iterator[None]:
    """``modules`` on ``device`` inside the block and back where they were after it: the
    frozen models a run uses now and then (the text encoders and VAE filling the caches,
    rendering samples) leave the GPU's memory to training between uses (FLUX.1's T5 alone
    is 9.5 GB in bf16). A no-op on the CPU."""
    were = [next(module.parameters()).device for module in modules]
    for module in modules:
        module.to(device)
    try:
        yield
    finally:
        for module, where in zip(modules, were, strict=True):
            module.to(where)
