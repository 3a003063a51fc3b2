"""How a verdict reaches Snakemake: gate inputs and done markers.

Snakemake decides by modification times, and the workflow profile leaves it nothing else to
compare (``rerun-triggers: [mtime]``). Every data input is ``ancient()``, so only these extra
inputs can make a job run:

- a stale stage takes the *stale gate*, one shared file whose date is set to the planning
  moment: newer than the outputs it has, older than those it will write (a date in the future
  would not do: Snakemake fails a job whose outputs come out older than its inputs); a fresh
  stage takes no gate at all;
- every stage has a ``touch()`` marker output, ``.cache/done/<ds>/<stage>``, and a stale
  stage takes the markers of every stage it reads from as plain inputs. When one of those
  runs — because it is stale, or only to rebuild a missing output, or because Snakemake found
  its last run incomplete — its marker is renewed and the stale consumer runs in the same
  invocation. Without it Snakemake would not even look at the consumer's gate until the next
  invocation (an ancient input's producer running hides the consumer: Snakemake issue
  #4166), and a run would end with exit 0 and a stale target.

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
