"""How a verdict reaches Snakemake: gate inputs and done markers.

Snakemake decides by modification times, and the workflow profile leaves it nothing else to
compare (``rerun-triggers: [mtime]``). Every data input is ``ancient()``, so only these extra
inputs can make a job run:

- a stale stage takes the *stale gate*, one shared file whose date is set to the planning
  moment: newer than the outputs it has, older than those it will write (a date in the future
  would not do: Snakemake fails a job whose outputs come out older than its inputs); a fresh
  stage takes no gate at all;
- every stage has a ``touch()`` marker output, ``.cache/done/<ds>/<stage>``, and a consumer of
  a stage that will run takes that marker as a plain input. Without it Snakemake would not
  rerun the consumer in the same invocation (an ancient input's producer running does not
  count: Snakemake issue #4166).

Markers are created once, with an old date, where missing: Snakemake reruns a job whose
output is missing. Beyond those, a run (dry or not) only re-dates the stale gate.
"""

from __future__ import annotations

import os
from pathlib import Path

from loramill.files import write_text

STALE_GATE = Path(".cache/gates/stale")
DONE = Path(".cache/done")
# Old, but not 0: Snakemake skips its mtime comparison when a job's oldest output has mtime 0.
LONG_AGO = 1


def stale_gate() -> str:
    """The stale gate, dated now. Called once per planning pass (the workflow caches it), which
    ends before any job starts: a later call would date it after outputs already written."""
    if not STALE_GATE.exists():
        write_text(STALE_GATE, "the input of every stale stage, dated when it was planned\n")
    os.utime(STALE_GATE)
    return STALE_GATE.as_posix()


def done_marker(ds: str, stage: str) -> str:
    return (DONE / ds / stage).as_posix()


def ensure_markers(ds: str, stages: list[str]) -> None:
    for stage in stages:
        marker = Path(done_marker(ds, stage))
        if not marker.exists():
            write_text(marker, "")
            os.utime(marker, (LONG_AGO, LONG_AGO))
