"""The one-line reason of every job that failed, for the summary at the end of a run.

With ``keep-going`` (the default profile) one dataset's failure does not stop the others, and
Snakemake's own report of it scrolls away above the other datasets' jobs. Each failing job
leaves its one line here; the workflow's ``onerror:`` prints those of this run last.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

from loramill.files import write_text

FAILURES = Path(".cache/failures")


def _path(job: str) -> Path:
    return FAILURES / job.replace("/", "_").replace(" ", "_")


def record(job: str, reason: str) -> None:
    """``job``: the rule and its wildcards ("train wide_bands")."""
    write_text(_path(job), f"{job}: {reason}\n")


def clear(job: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        _path(job).unlink()


def since(started: float) -> list[str]:
    """The failures recorded at or after ``started`` (a time.time()), oldest first."""
    if not FAILURES.is_dir():
        return []
    found = [(p.stat().st_mtime, p) for p in FAILURES.iterdir() if p.is_file()]
    return [p.read_text(encoding="utf-8").strip() for t, p in sorted(found) if t >= started]


def summary(started: float) -> str:
    """What the end of a failed run says: each failed job and its reason, one line each
    (nothing when no job recorded one: Snakemake's own error said it all)."""
    lines = since(started)
    if not lines:
        return ""
    head = f"loramill: {len(lines)} job(s) failed:"
    return "".join(f"{line}\n" for line in [head, *(f"  {line}" for line in lines)])


def now() -> float:
    """The start of a run, slightly early: a file's mtime can trail time.time() by a tick."""
    return time.time() - 1
