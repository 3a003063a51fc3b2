"""Content-keyed reruns: fingerprints, committed locks, gates and the run-cache.

Snakemake decides reruns by modification times, which a `git clone && dvc pull` scrambles and
which ignore what actually changed. Instead, every (dataset, stage) gets a fingerprint of what
its result depends on — its config values, its code, library versions, the base model, the
content of its inputs — and each finished job records it with its outputs' hashes in a
committed lock file ``locks/<ds>/<stage>.json`` (like dvc.lock).

At parse time a stage is *fresh* when its lock matches today's fingerprint and no present output
differs from the lock; a stage downstream of a stale one is stale too. The verdict reaches
Snakemake through a gate file that is an ordinary rule input (rules read data inputs as
``ancient()``): fresh → mtime at the epoch, stale → mtime now. Missing outputs of a fresh stage
are fine: Snakemake rebuilds them only when a consumer must run.

At job time the fingerprint is recomputed from the real inputs. If the run-cache holds that
fingerprint, the outputs are restored instead of recomputed: reverting a change does not
retrain, and a stage whose inputs came out byte-identical after an upstream rerun is restored
in milliseconds (early cutoff).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.files import write_json, write_text
from loramill.hashing import DEFAULT_DB, HashCache, hash_value
from loramill.model import base_model_hash
from loramill.stages import STAGES, Stage, code_files, pick, stage_config, versions

LOCKS = Path("locks")
GATES = Path(".gates")
DONE = Path(".done")
RUNS = Path(".cache/runs")
SCRIPTS = Path("scripts")
EPOCH = 0


@dataclass
class Verdict:
    stage: str
    dataset: str
    reasons: list[str] = field(default_factory=list)

    @property
    def fresh(self) -> bool:
        return not self.reasons

    def line(self) -> str:
        return f"{self.stage} {self.dataset}: {'; '.join(self.reasons)}"


def lock_path(stage: str, ds: str) -> Path:
    return LOCKS / ds / f"{stage}.json"


def read_lock(stage: str, ds: str) -> dict[str, Any] | None:
    try:
        return json.loads(lock_path(stage, ds).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None  # a broken lock (say, a bad merge) just means: rebuild


def base_model_fingerprint(spec: str, hashes: HashCache) -> str:
    try:
        return base_model_hash(spec, hashes)
    except LoramillError:  # a hub id not in the local cache: the id is all there is
        return f"hub:{spec}"


def raw_inputs(stage: Stage, settings: dict[str, Any], hashes: HashCache) -> dict[str, str]:
    """Dataset folders the stage reads, and files named by its config (``train.init_from``)."""
    folders = [f"{settings['path'].rstrip('/')}/{sub}" for sub in stage.raw_inputs]
    named = [pick(settings, key) for key in stage.config_files]
    return hashes.paths(folders + [path for path in named if path])


def consumed_paths(stage: Stage, ds: str) -> list[str]:
    return [template.format(ds=ds) for _, template in stage.consumes]


def under(hashes: dict[str, str], paths: list[str]) -> dict[str, str]:
    """The entries of a path → hash map that are one of ``paths`` or inside one of them."""
    prefixes = tuple(p.rstrip("/") + "/" for p in paths)
    return {k: v for k, v in hashes.items() if k in paths or k.startswith(prefixes)}


def digests(paths: list[str], hashes: HashCache) -> dict[str, str]:
    """One hash per existing output or produced input (a folder hashes as its manifest)."""
    return {path: hashes.digest(path) for path in paths if os.path.exists(path)}


def components(
    stage: Stage, settings: dict[str, Any], inputs: dict[str, str], hashes: HashCache
) -> dict[str, Any]:
    script = SCRIPTS / f"{stage.name}.py"
    code = {p.name: hashes.file(p) for p in code_files(stage.module)}
    if script.exists():
        code[script.as_posix()] = hashes.file(script)
    return {
        "stage": stage.name,
        "config": stage_config(stage, settings),
        "code": code,
        "versions": versions(stage.packages),
        "base_model": (
            base_model_fingerprint(settings["base_model"], hashes) if stage.base_model else None
        ),
        "inputs": dict(sorted(inputs.items())),
    }


# --- explaining staleness in the user's terms ---------------------------------------------


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _diff_counts(old: dict[str, str], new: dict[str, str]) -> tuple[int, int, int]:
    changed = sum(1 for k in old.keys() & new.keys() if old[k] != new[k])
    return changed, len(new.keys() - old.keys()), len(old.keys() - new.keys())


def explain(old: dict[str, Any], new: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    reasons = []
    keys = _changed(_flatten(old.get("config", {})), _flatten(new["config"]))
    if keys:
        shown = ", ".join(keys[:3]) + (", …" if len(keys) > 3 else "")
        reasons.append(f"config {shown} changed")
    files = _changed(old.get("code", {}), new["code"])
    if files:
        reasons.append(f"code changed ({', '.join(Path(f).name for f in files)})")
    packages = _changed(old.get("versions", {}), new["versions"])
    if packages:
        was = old.get("versions", {})
        reasons.append(
            ", ".join(f"{p} {was.get(p, '?')} → {new['versions'].get(p, '?')}" for p in packages)
        )
    if old.get("base_model") != new["base_model"]:
        reasons.append("base model changed")
    old_inputs, new_inputs = old.get("inputs", {}), new["inputs"]
    if old_inputs != new_inputs:
        root = settings["path"].rstrip("/")
        images, captions = f"{root}/images/", f"{root}/captions/"
        changed, added, removed = _diff_counts(
            under(old_inputs, [images]), under(new_inputs, [images])
        )
        if changed or added or removed:
            counts = zip((changed, added, removed), ("changed", "added", "removed"), strict=True)
            reasons.append(f"images changed ({', '.join(f'{n} {w}' for n, w in counts if n)})")
        edits = sum(_diff_counts(under(old_inputs, [captions]), under(new_inputs, [captions])))
        if edits:
            reasons.append(f"captions edited ({edits} image{'s' if edits > 1 else ''})")
        own = (images, captions)
        rest = [k for k in _changed(old_inputs, new_inputs) if not k.startswith(own)]
        if rest:
            reasons.append(f"inputs changed ({', '.join(Path(k).name for k in rest)})")
    return reasons or ["fingerprint changed"]


# --- parse time: verdicts and gates -------------------------------------------------------


def assess(datasets: dict[str, dict[str, Any]], hashes: HashCache) -> list[Verdict]:
    """A verdict for every (dataset, stage), in stage order."""
    verdicts = []
    for ds, settings in datasets.items():
        by_stage: dict[str, Verdict] = {}
        for stage in STAGES.values():
            verdict = Verdict(stage.name, ds)
            lock = read_lock(stage.name, ds)
            stale_upstream = [u for u in stage.upstream if not by_stage[u].fresh]
            if lock is None:
                verdict.reasons.append("never built")
            elif stale_upstream:
                verdict.reasons.append(f"after {', '.join(stale_upstream)}")
            else:
                inputs = raw_inputs(stage, settings, hashes)
                for upstream, template in stage.consumes:
                    path = template.format(ds=ds)
                    upstream_outputs = read_lock(upstream, ds)["outputs"]  # fresh: lock exists
                    inputs[path] = upstream_outputs.get(path, "missing")
                current = components(stage, settings, inputs, hashes)
                if hash_value(current) != lock["fingerprint"]:
                    verdict.reasons.extend(explain(lock["components"], current, settings))
                elif modified_outputs(stage, ds, lock, hashes):
                    verdict.reasons.append("outputs differ from the lock (edited by hand?)")
            by_stage[stage.name] = verdict
            verdicts.append(verdict)
    return verdicts


def modified_outputs(stage: Stage, ds: str, lock: dict[str, Any], hashes: HashCache) -> bool:
    present = digests(stage.paths(stage.outputs, ds), hashes)
    return any(lock["outputs"].get(path) != digest for path, digest in present.items())


def done_marker(ds: str, stage: str) -> str:
    return (DONE / ds / stage).as_posix()


def write_gates(verdicts: list[Verdict]) -> None:
    """Fresh: epoch mtime. Stale: mtime now and new content (content hides no change).

    Done markers are created where missing (they are gitignored, and a missing output would
    make Snakemake rerun a fresh stage after a clone).
    """
    for verdict in verdicts:
        marker = Path(done_marker(verdict.dataset, verdict.stage))
        if not marker.exists():
            write_text(marker, "")
            # Old, but not 0: Snakemake skips its mtime comparison when the oldest output
            # of a job has mtime 0.
            os.utime(marker, (EPOCH + 1, EPOCH + 1))
        gate = GATES / verdict.dataset / verdict.stage
        if verdict.fresh:
            if not gate.exists() or gate.read_text() != "fresh\n":
                write_text(gate, "fresh\n")
            os.utime(gate, (EPOCH, EPOCH))
        else:
            write_text(gate, f"stale {time.time_ns()}: {'; '.join(verdict.reasons)}\n")


# --- job time: lock and run-cache ---------------------------------------------------------


def _copy(source: Path, destination: Path) -> None:
    if destination.is_dir():
        shutil.rmtree(destination)
    elif destination.exists():
        destination.unlink()
    destination.parent.mkdir(parents=True, exist_ok=True)
    if source.is_dir():
        shutil.copytree(source, destination)
    else:
        shutil.copy2(source, destination)


def store(fingerprint: str, paths: list[str]) -> None:
    """Keep copies of a job's outputs under its fingerprint (copies, not links: an output
    edited in place must not change the cached result)."""
    entry = RUNS / fingerprint
    if entry.exists():
        return
    staging = RUNS / f".{fingerprint}.{os.getpid()}"
    for path in paths:
        if os.path.exists(path):
            _copy(Path(path), staging / path)
    staging.mkdir(parents=True, exist_ok=True)
    os.replace(staging, entry)


def restore(fingerprint: str, paths: list[str]) -> bool:
    entry = RUNS / fingerprint
    if not entry.is_dir():
        return False
    for path in paths:
        if (entry / path).exists():
            _copy(entry / path, Path(path))
    return True


def job_components(stage: Stage, ds: str, settings: dict[str, Any], hashes: HashCache) -> dict:
    """The fingerprint components of a job, from the inputs it actually has."""
    inputs = raw_inputs(stage, settings, hashes)
    inputs.update(digests(consumed_paths(stage, ds), hashes))
    return components(stage, settings, inputs, hashes)


def run_keyed(
    stage_name: str,
    ds: str,
    settings: dict[str, Any],
    compute: Callable[[dict[str, Any]], Any],
    log: Any,
) -> None:
    """Run a stage job: restore from the run-cache when possible, else compute; then lock.

    ``compute`` receives the job's fingerprint components (train keys its resumable state
    on them)."""
    stage = STAGES[stage_name]
    hashes = HashCache(DEFAULT_DB)
    current = job_components(stage, ds, settings, hashes)
    fingerprint = hash_value(current)
    outputs = stage.paths(stage.outputs, ds)
    kept = outputs + stage.paths(stage.logs, ds)
    if restore(fingerprint, kept):
        log.info("restored from the run-cache (%s): nothing recomputed", fingerprint[:12])
    else:
        compute(current)
        store(fingerprint, kept)
    lock = {
        "stage": stage_name,
        "dataset": ds,
        "fingerprint": fingerprint,
        "components": current,
        "outputs": digests(outputs, hashes),
    }
    write_json(lock_path(stage_name, ds), lock)
    hashes.save()
