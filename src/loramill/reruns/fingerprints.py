"""What a stage's result depends on, computed from what its job receives.

A job receives its params and its inputs; its result depends on those, on the code that
runs and on the libraries underneath. :func:`components` turns exactly that into data, and the
workflow calls it twice: when planning (with the rule's params evaluated for the dataset and
produced inputs taken from their producers' locks) and inside the job (with what Snakemake
passed it). No list of config keys or consumed paths is kept by hand, so nothing can drift:
a setting reaches a stage only through its params, and then it is in the fingerprint.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramill.content_params import BY_CONTENT
from loramill.dataset_files import METADATA, SUFFIXES, folder_hashes, row_hashes
from loramill.hashing import HashCache, hash_value
from loramill.reruns.code import CodeFingerprint, code_fingerprint
from loramill.software import RUNS_ALSO, versions

# Under `--sdm conda` jobs run in the env built from this file, not in Snakemake's own: the
# main process puts the file's hash here and jobs inherit it, so both sides compare the same
# thing (the versions Snakemake's interpreter sees would say nothing about the job's).
CONDA_ENV_VAR = "LORAMILL_CONDA_ENV"
# The component that says where each code part lives: shown in reasons, not fingerprinted.
WHERE = "code_where"


@dataclass(frozen=True)
class Job:
    """What a stage's job receives, for one dataset."""

    rule: str
    script: Path
    params: dict[str, Any]
    inputs: dict[str, list[str]]  # named inputs (the gate excluded), each a list of paths
    dataset_root: str


def software(packages: tuple[str, ...]) -> dict[str, str]:
    conda_env = os.environ.get(CONDA_ENV_VAR)
    if conda_env:
        return {"conda env": conda_env}
    also = (extra for package in packages for extra in RUNS_ALSO.get(package, ()))
    return versions(tuple(sorted({*packages, *also})))


def stage_code(script: Path, hashes: HashCache) -> CodeFingerprint:
    """The code a stage's script runs; remembered across runs while no file it read (or
    looked for) changed: a planning pass asks for every dataset, and parsing costs ~0.1 s."""

    def compute() -> tuple[dict[str, Any], list[str]]:
        code = code_fingerprint(script)  # the job runner says it is not fingerprinted
        value = {"parts": code.parts, "where": code.where, "packages": list(code.packages)}
        return value, list(code.files)

    key = f"code:{Path(script).resolve()}"
    found = hashes.remember(key, lambda: hashes.derived(key, compute))
    return CodeFingerprint(found["parts"], tuple(found["packages"]), found["where"], ())


def _by_content(key: str, value: Any, params: dict[str, Any], hashes: HashCache) -> Any:
    """Params that name files the job reads stand for those files' content, not their path."""
    by_content = BY_CONTENT.get(key)
    if by_content is None:
        return value
    unsafe = bool(params.get("allow_unsafe_weights"))
    content = lambda: by_content.fingerprint(value, hashes, unsafe)  # noqa: E731
    return hashes.remember(f"{key}:{value}:{unsafe}", content)


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
        WHERE: code.where,
    }


def fingerprint(parts: dict[str, Any]) -> str:
    """The stage's key: every component but where its code lives (moving code is free)."""
    return hash_value({name: value for name, value in parts.items() if name != WHERE})
