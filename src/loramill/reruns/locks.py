"""Committed lock files: what each (dataset, stage) was last built from, and what it made.

``locks/<ds>/<stage>.json`` (like dvc.lock, one file per dataset and stage so teammates
rarely conflict) holds the job's fingerprint, its components (to explain a change in the
user's terms) and the hashes of its outputs, keyed by output name. Nothing in a lock names the
dataset or a path, so a renamed dataset can take over its old locks.

A lock that cannot be used — unreadable, cut short by a bad merge, from an older format —
only means "rebuild": one warning line, never a traceback.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from loramill.files import write_json

LOCKS = Path("locks")
FORMAT = 2
log = logging.getLogger("loramill")


def lock_path(ds: str, stage: str) -> Path:
    return LOCKS / ds / f"{stage}.json"


def problem(lock: Any) -> str | None:
    """Why ``lock`` cannot be used, or None."""
    if not isinstance(lock, dict):
        return "not a JSON object"
    if lock.get("format") != FORMAT:
        return f"format {lock.get('format', 1)}, this loramill writes format {FORMAT}"
    kinds = {"fingerprint": str, "components": dict, "outputs": dict}
    missing = [key for key, kind in kinds.items() if not isinstance(lock.get(key), kind)]
    return f"missing {', '.join(missing)}" if missing else None


def read_lock(ds: str, stage: str) -> dict[str, Any] | None:
    """The lock, or None when there is none or it is unusable (warned once, here)."""
    path = lock_path(ds, stage)
    try:
        lock = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        lock, why = None, f"unreadable ({error})"
    else:
        why = problem(lock)
    if why:
        log.warning("loramill: %s: %s; %s %s will be rebuilt", path, why, stage, ds)
        return None
    return lock


def write_lock(
    ds: str, stage: str, fingerprint: str, components: dict[str, Any], outputs: dict[str, str]
) -> None:
    lock = {
        "format": FORMAT,
        "stage": stage,
        "fingerprint": fingerprint,
        "components": components,
        "outputs": outputs,
    }
    write_json(lock_path(ds, stage), lock)


def locks_of(stage: str) -> dict[str, Path]:
    """Every dataset's lock file for ``stage``, by dataset name (renamed ones included)."""
    return {path.parent.name: path for path in sorted(LOCKS.glob(f"*/{stage}.json"))}
