"""How a job's OpenMP threads wait for one another (issues #25 and #28).

torch's CPU kernels run on libgomp's thread team; between parallel regions a thread waits for
the next. Its default is to spin for a while (about 3 ms), which beside other busy processes
made a training step 10-37× slower (a spinning thread holds a core the descheduled thread it
waits for needs). Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) fixed that but cost every
region a wake-up: 6-15 % of a real-size step on a quiet machine, half of a tiny model's. A
short spin before sleeping keeps most of both: beside 4 busy processes as fast as sleeping at
once, on a quiet machine most of spinning's speed (bench/README.md, "OpenMP wait policy under
load"). Longer spins are faster still when quiet, and slower under load than sleeping.

libgomp reads these variables when torch loads, so they are set in the environment a job
starts with (rules/setup.smk), never inside one.
"""

from __future__ import annotations

from collections.abc import Mapping

# Iterations of libgomp's wait loop before a thread sleeps (its default with no policy set is
# 300000; libgomp counts about 100000 per millisecond). 3000 and 10000 were slower under load.
SPIN_COUNT = "1000"
VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")


def job_environment(environ: Mapping[str, str]) -> dict[str, str]:
    """The OpenMP settings jobs get on top of ``environ``: none when the user chose a wait
    policy or a spin count (either decides libgomp's wait: theirs stands)."""
    if any(name in environ for name in VARIABLES):
        return {}
    return {"GOMP_SPINCOUNT": SPIN_COUNT}
