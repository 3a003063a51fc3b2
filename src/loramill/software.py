"""The libraries whose versions matter, and how their versions are read and compared.

The one list, read three ways: an adapter's provenance names the exact versions of the
libraries that computed it (loramill.train), a grid cell's cache key the releases of those
that draw it (loramill.grid), and a stage's fingerprint the releases of the distributions its
code imports (loramill.reruns: the code analysis finds those, ``RUNS_ALSO`` adds what they run
without the stage importing it). loramill's own release is on none of them: a version bump
alone must not retrain, the code that runs is fingerprinted instead.
"""

from __future__ import annotations

import importlib.metadata
from functools import cache

from packaging.version import InvalidVersion, Version

# The libraries whose code computes an adapter, in the order its provenance lists them.
LIBRARIES = ("torch", "diffusers", "transformers", "peft", "accelerate", "safetensors")
# Of those, the ones that only load weights and place them on devices: a rendered image's
# pixels do not depend on their version, so a grid cell's key leaves them out.
LOADING_ONLY = ("accelerate", "safetensors")
RENDERING = tuple(name for name in LIBRARIES if name not in LOADING_ONLY)
# Libraries that run code of another without the stage importing it: diffusers builds the
# pipeline's CLIP text encoder and tokenizer with transformers.
RUNS_ALSO = {"diffusers": ("transformers",)}


def release(version: str) -> str:
    """``2.13.0+cpu`` and ``2.13.0+cu128`` are one release: local labels say how it was built."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version.split("+", 1)[0]


@cache
def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Each package's release, ``absent`` when it is not installed: what keys compare (read
    once per process)."""
    found = {}
    for package in packages:
        try:
            found[package] = release(importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def installed(packages: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """Each package's exact installed version, local label included (``2.13.0+cpu``): what a
    provenance records, for a reader to see how the libraries were built."""
    return {name: importlib.metadata.version(name) for name in packages}
