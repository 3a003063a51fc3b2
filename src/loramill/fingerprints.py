"""What a stage's result depends on, computed from what its job receives.

A job receives its params and its inputs; its result depends on those, on the code that
runs and on the libraries underneath. :func:`components` turns exactly that into data, and the
workflow calls it twice: when planning (with the rule's params evaluated for the dataset and
produced inputs taken from their producers' locks) and inside the job (with what Snakemake
passed it). No list of config keys or consumed paths is kept by hand, so nothing can drift:
a setting reaches a stage only through its params, and then it is in the fingerprint.
"""

from __future__ import annotations

import importlib.metadata
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from packaging.version import InvalidVersion, Version

from loramill.base_model_files import base_model_fingerprint
from loramill.caption_cache import model_fingerprint
from loramill.caption_edits import METADATA, row_hashes
from loramill.code_hash import PACKAGE_DIR, CodeFingerprint, code_fingerprint
from loramill.dataset_files import SUFFIXES, folder_hashes
from loramill.hashing import HashCache, hash_value
from loramill.text_model import language_model_fingerprint

# Under `--sdm conda` jobs run in the env built from this file, not in Snakemake's own: the
# main process puts the file's hash here and jobs inherit it, so both sides compare the same
# thing (the versions Snakemake's interpreter sees would say nothing about the job's).
CONDA_ENV_VAR = "LORAMILL_CONDA_ENV"
# Libraries that run code of another without the stage importing it: diffusers builds the
# pipeline's CLIP text encoder and tokenizer with transformers.
RUNS_ALSO = {"diffusers": ("transformers",)}


@dataclass(frozen=True)
class Job:
    """What a stage's job receives, for one dataset."""

    rule: str
    script: Path
    params: dict[str, Any]
    inputs: dict[str, list[str]]  # named inputs (the gate excluded), each a list of paths
    dataset_root: str


def release(version: str) -> str:
    """``2.13.0+cpu`` and ``2.13.0+cu128`` are one release: local labels say how it was built."""
    try:
        return Version(version).public
    except InvalidVersion:
        return version.split("+", 1)[0]


@cache
def versions(packages: tuple[str, ...]) -> dict[str, str]:
    found = {}
    for package in packages:
        try:
            found[package] = release(importlib.metadata.version(package))
        except importlib.metadata.PackageNotFoundError:
            found[package] = "absent"
    return found


def software(packages: tuple[str, ...]) -> dict[str, str]:
    conda_env = os.environ.get(CONDA_ENV_VAR)
    if conda_env:
        return {"conda env": conda_env}
    also = (extra for package in packages for extra in RUNS_ALSO.get(package, ()))
    return versions(tuple(sorted({*packages, *also})))


def stage_code(script: Path, hashes: HashCache) -> CodeFingerprint:
    """The code a stage's script runs; remembered across runs while no file it read changed
    (a planning pass asks for every dataset, and parsing the package costs ~0.1 s)."""

    def compute() -> tuple[dict[str, Any], list[str]]:
        code = code_fingerprint(script)
        modules = {part.split(":")[0] for part in code.parts if part.startswith("loramill")}
        files = [PACKAGE_DIR / f"{m.partition('.')[2] or '__init__'}.py" for m in modules]
        value = {"parts": code.parts, "packages": list(code.packages)}
        return value, [str(script), *map(str, files)]

    key = f"code:{Path(script).resolve()}"
    found = hashes.remember(key, lambda: hashes.derived(key, compute))
    return CodeFingerprint(found["parts"], tuple(found["packages"]))


def _by_content(key: str, value: Any, params: dict[str, Any], hashes: HashCache) -> Any:
    """Params that name files the job reads stand for those files' content, not their path."""
    if key == "base_model":
        unsafe = bool(params.get("allow_unsafe_weights"))
        fingerprint = lambda: base_model_fingerprint(value, hashes, unsafe)  # noqa: E731
        return hashes.remember(f"base_model:{value}:{unsafe}", fingerprint)
    if key == "language_model":  # a text dataset's base model (loramill.text_model)
        unsafe = bool(params.get("allow_unsafe_weights"))
        fingerprint = lambda: language_model_fingerprint(value, hashes, unsafe)  # noqa: E731
        return hashes.remember(f"language_model:{value}:{unsafe}", fingerprint)
    if key == "init_from":
        return hashes.file(value) if value else ""
    if key == "caption_model":  # a folder replaced in place recaptions
        return hashes.remember(f"caption_model:{value}", lambda: model_fingerprint(value, hashes))
    return value


def _params(value: Any, params: dict[str, Any], hashes: HashCache, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _params(v, params, hashes, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_params(v, params, hashes) for v in value]
    return _by_content(key, value, params, hashes)


def _dataset_input(job: Job, path: str, hashes: HashCache) -> Any:
    """The hashes of ``path`` when it is a dataset folder (``images``, ``captions``: one per
    file) or the edits table (one per image's row), else None."""
    relative = os.path.relpath(path, job.dataset_root)
    if relative in SUFFIXES:
        return folder_hashes(path, relative, hashes)
    if relative == METADATA and os.path.isfile(path):
        return row_hashes(path, hashes)
    return None


def stage_provenance(parts: dict[str, Any]) -> dict[str, Any]:
    """What an adapter's metadata says of the stage that trained it: its fingerprint (the key
    of locks/<ds>/train.json) and the parts a reader checks — the data it received, the base
    model's content, the software; the effective config is in the provenance already."""
    params = parts.get("params", {})
    return {
        "fingerprint": fingerprint(parts),
        "inputs": parts.get("inputs", {}),
        "base_model": params.get("base_model"),
        "software": parts.get("software", {}),
    }


def components(job: Job, produced: Callable[[str, str], str], hashes: HashCache) -> dict[str, Any]:
    """The fingerprint's parts. ``produced(name, path)`` is the hash of an input another stage
    makes: its producer's lock when planning, the file itself inside the job."""
    inputs: dict[str, Any] = {}
    for name, paths in job.inputs.items():
        hashed = []
        for path in paths:
            found = _dataset_input(job, path, hashes)
            hashed.append(produced(name, path) if found is None else found)
        inputs[name] = hashed
    code = stage_code(job.script, hashes)
    return {
        "rule": job.rule,
        "params": _params(job.params, job.params, hashes),
        "inputs": inputs,
        "code": code.parts,
        "software": software(code.packages),
    }


def fingerprint(parts: dict[str, Any]) -> str:
    return hash_value(parts)
