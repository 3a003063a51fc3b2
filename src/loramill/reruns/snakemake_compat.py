"""The Snakemake versions loramill's content-keyed reruns are tested with.

loramill decides reruns by content (verdicts.py, gates.py, rules/common.smk) by steering
Snakemake through modification times, which leans on details of how Snakemake decides what to
run: details that are not part of its documented interface and have changed between releases.
Each one is pinned by a test in tests/test_snakemake_behaviour.py; BEHAVIOURS names them. The
workflow refuses any Snakemake outside the range those tests passed with, rather than silently
rerunning too much (hours of training) or too little (stale adapters).

To widen the range: install the new release, run `pytest tests/test_snakemake_behaviour.py`,
and move TESTED (and the pin in pyproject.toml / constraints.txt) only if every test passes.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

from loramill import LoramillError

# [lowest tested release, first untested release), as major.minor.
TESTED = ("9.27", "9.28")
# The release pyproject.toml and constraints.txt install.
PINNED = "9.27.1"

# What the mechanism relies on, one test each in tests/test_snakemake_behaviour.py.
BEHAVIOURS = (
    "rerun-triggers [mtime] ignores changed params and edited script: files",
    "an ancient() input newer than the outputs does not rerun a job; a plain one does",
    "an input newer than the outputs reruns a job each time it is listed, nothing once it is "
    "not; but a job fails afterwards when any input (ancient or not) is still newer than "
    "its outputs, so a gate must be touched to the present (at parse), not the far future",
    "Snakemake issue #4166: a consumer of an ancient() input is not rerun when its producer "
    "reruns, unless it also takes a plain input of that producer (its touch() marker)",
    "a missing touch() marker reruns a job only when its rule is a target by name; a marker "
    "at mtime epoch+1 is harmless; at mtime 0 Snakemake skips the mtime check altogether",
    "input functions run after workflow.dag_settings is attached (rerun_triggers, "
    "max_checksum_file_size, forcerun holding the rule names of -R); at parse time it is None",
    "an input function returning [] gives a script an empty named input; a log: may be "
    "a directory()",
    "workflow.is_main_process is True while the main process parses (cluster jobs re-parse "
    "with it False)",
    "max-checksum-file-size 0 still checksums empty files: an empty input newer than the "
    "outputs does not rerun a job whose metadata recorded it, so gates must not be empty",
    "SIGINT to Snakemake alone stops none of its running jobs (it waits for them to end), so "
    "the workflow passes signals on; onstart: runs after Snakemake set its SIGTERM handler",
)


def _minor(version: str) -> tuple[int, int]:
    release = Version(version).release
    return release[0], release[1] if len(release) > 1 else 0


def check_snakemake_version(version: str) -> None:
    """Raise LoramillError (one line) unless `version` lies in the TESTED range.

    Pre-releases count as their release: 9.28.0rc1 is outside, 9.27.0.post1 inside.
    """
    try:
        inside = _minor(TESTED[0]) <= _minor(version) < _minor(TESTED[1])
    except InvalidVersion:
        inside = False
    if not inside:
        raise LoramillError(
            f"Snakemake {version} is outside the range loramill's content-keyed reruns are "
            f"tested with (>={TESTED[0]}, <{TESTED[1]}): install the pinned one with "
            f"`make install` (snakemake=={PINNED})"
        )
