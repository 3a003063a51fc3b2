"""How `make test` splits the suite between xdist workers (`-n 3 --dist loadscope`).

A work unit is a test module, so its module fixtures are built once, except that each test of
a module marked `spread` is a unit of its own (its module fixtures are cheap; its tests are
many and slow, and one worker alone would finish long after the others), and every test
using one of SHARED_BUILDS joins one unit across modules, so that build runs once per session
instead of once per worker (its users may also run Snakemake in it, which two workers at once
could not). Units holding slow tests go first, so the longest start together and the quick ones
fill in around them (the order holds with --no-loadscope-reorder).

xdist's own loadgroup cannot do this with pytest 9 (it renames node ids, which pytest 9 no
longer lets a plugin do), and the controller that schedules sees node ids only: the workers,
which collect, write each test's unit to a shared folder for it to read.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Session fixtures that build something large and whose users must share one worker.
SHARED_BUILDS = ("demo_run",)
# Session fixtures built once for all workers (the first to ask builds, the others wait on a
# lock: conftest.small_build). The unit with most tests using one goes first, so that it is
# built while another worker runs the shared build's unit; the other users go after the
# remaining slow units, when it is there.
CROSS_WORKER_BUILDS = ("small_build",)
FOLDER = "LORAMILL_TEST_UNITS"  # environment variable: where the workers write the units


def pytest_configure(config: pytest.Config) -> None:
    """On the controller: a folder for the workers' unit tables (they inherit the variable)."""
    if getattr(config.option, "dist", "no") == "loadscope" and not hasattr(config, "workerinput"):
        os.environ[FOLDER] = tempfile.mkdtemp(prefix="loramill-units-")
        atexit.register(shutil.rmtree, os.environ[FOLDER], ignore_errors=True)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On a worker: order the tests unit by unit, slow units first, and write the table."""
    if not hasattr(config, "workerinput") or FOLDER not in os.environ:
        return
    units: dict[str, list[pytest.Item]] = {}
    for item in items:
        shared = [name for name in SHARED_BUILDS if name in item.fixturenames]
        alone = item.get_closest_marker("spread")
        unit = shared[0] if shared else item.nodeid if alone else item.nodeid.split("::")[0]
        units.setdefault(unit, []).append(item)

    def users(unit: str, build: str) -> int:
        return sum(build in item.fixturenames for item in units[unit])

    builders = {max(units, key=lambda unit: users(unit, b)) for b in CROSS_WORKER_BUILDS}

    def order(unit: str) -> int:
        if unit in SHARED_BUILDS or unit in builders:
            return 0
        if not any(item.get_closest_marker("workflow") for item in units[unit]):
            return 3
        return 2 if any(users(unit, build) for build in CROSS_WORKER_BUILDS) else 1

    items[:] = [item for unit in sorted(units, key=order) for item in units[unit]]
    table = {item.nodeid: unit for unit, members in units.items() for item in members}
    path = Path(os.environ[FOLDER]) / f"{config.workerinput['workerid']}.json"
    path.with_suffix(".tmp").write_text(json.dumps(table))
    path.with_suffix(".tmp").replace(path)


@functools.cache
def units() -> dict[str, str]:
    """The workers' table; complete once every worker has collected, which is when xdist
    starts scheduling."""
    table = {}
    for path in Path(os.environ[FOLDER]).glob("*.json"):
        table.update(json.loads(path.read_text()))
    return table


@pytest.hookimpl(optionalhook=True)  # an xdist hook: unknown where xdist is switched off
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if getattr(config.option, "dist", "no") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class UnitScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return units().get(nodeid) or super()._split_scope(nodeid)

    return UnitScheduling(config, log)
