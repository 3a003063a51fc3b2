"""The Snakemake behaviours content-keyed reruns rely on, one test each (in the order of
loramill.reruns.snakemake_compat.BEHAVIOURS), plus the version check that keeps users on the range
these tests passed with.

Each test writes a tiny Snakefile into tmp_path, lays out files with chosen modification times
and asserts the exact jobs: planned in this process through Snakemake's API (what
`snakemake -n` runs, in a fraction of its time) wherever the plan shows the decision, run by
the real snakemake CLI wherever a job must run. They pin what Snakemake does, not what it
documents: when one fails after an upgrade, the mechanism in rules/common.smk and
src/loramill/reruns/ (staleness.py, gates.py) needs rethinking before TESTED in
snakemake_compat.py may move. Cluster jobs re-parse the Snakefile with
workflow.is_main_process False; that is not exercised here (no cluster).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import textwrap
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import BIN, REPO, run_tool
from snakemake.settings.enums import RerunTrigger
from workflow_plans import DryRunJob, dry_run

from loramill import LoramillError
from loramill.reruns.snakemake_compat import BEHAVIOURS, PINNED, TESTED, check_snakemake_version

# What profiles/default sets: only modification times trigger reruns, and no file is
# checksummed (but empty ones, see the last behaviour).
MTIME_ONLY = ("--rerun-triggers", "mtime", "--max-checksum-file-size", "0")
PLAN_MTIME_ONLY = {"rerun_triggers": {RerunTrigger.MTIME}, "max_checksum_file_size": 0}
FAR_FUTURE = 4102444800  # 2100-01-01
OLD = 1  # epoch + 1: a pre-created marker


def workflow(tmp_path: Path, snakefile: str, **files: float) -> Path:
    """Write the Snakefile, and a file per keyword (dots as `__`) with that mtime."""
    (tmp_path / "Snakefile").write_text(textwrap.dedent(snakefile))
    for name, mtime in files.items():
        touch(tmp_path / name.replace("__", "."), mtime)
    return tmp_path


def touch(path: Path, mtime: float, text: str = "not empty\n") -> None:
    """Write `text` (not empty by default: Snakemake checksums empty files, see below)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (mtime, mtime))


def snakemake(
    path: Path, *args: str, triggers: tuple[str, ...] = MTIME_ONLY, check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run snakemake on one core, with the profile's triggers unless told otherwise."""
    command = ("snakemake", "--cores", "1", *triggers, *args)
    return run_tool(*command, cwd=path, check=check, timeout=60)


def log(result: subprocess.CompletedProcess[str]) -> str:
    return result.stdout + result.stderr


def jobs(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The rule names of the jobs a run ran, sorted."""
    return sorted(re.findall(r"^(?:local)?rule (\w+):$", log(result), flags=re.MULTILINE))


def planned(
    path: Path, *targets: str, triggers: dict | None = PLAN_MTIME_ONLY, **dag
) -> list[DryRunJob]:
    """The jobs `snakemake -n` would list, with the profile's triggers unless told otherwise
    (None: Snakemake's defaults); ``config`` as --config, other keywords DAGSettings fields."""
    config = dag.pop("config", None)
    return dry_run(path, *targets, config=config, dag={**(triggers or {}), **dag})[1]


def rules(found: list[DryRunJob]) -> list[str]:
    return sorted(job.rule for job in found)


# ---- the behaviours ----------------------------------------------------------------------


def test_mtime_trigger_ignores_params_and_code(tmp_path: Path) -> None:
    path = workflow(
        tmp_path,
        """
        rule params_changed:
            output: "p.txt"
            params: value=config["value"]
            shell: "touch {output}"

        rule script_edited:  # never runs: its output is laid out by the test
            output: "s.txt"
            script: "s.py"
        """,
    )
    assert jobs(snakemake(path, "params_changed", "--config", "value=1")) == ["params_changed"]
    now = time.time()
    touch(path / "s.txt", now - 60)
    touch(path / "s.py", now)
    changed = ("params_changed", "script_edited")
    assert rules(planned(path, *changed, config={"value": 2})) == []
    # The contrast: Snakemake's default triggers rerun both.
    both = planned(path, *changed, config={"value": 2}, triggers=None)
    assert rules(both) == ["params_changed", "script_edited"]


def test_ancient_input_newer_than_output_does_not_rerun(tmp_path: Path) -> None:
    now = time.time()
    path = workflow(
        tmp_path,
        """
        rule ancient_input:
            input: ancient("in.txt")
            output: "a.txt"
            shell: "touch {output}"

        rule plain_input:
            input: "in.txt"
            output: "p.txt"
            shell: "touch {output}"
        """,
        a__txt=now - 60,
        p__txt=now - 60,
        in__txt=now,
    )
    assert rules(planned(path, "a.txt", "p.txt")) == ["plain_input"]


def test_far_future_input_reruns_while_listed_but_fails_the_job(tmp_path: Path) -> None:
    path = workflow(
        tmp_path,
        """
        import os, time

        os.utime("now_gate", (time.time(), time.time()))

        def gate(rule, path):
            return lambda wildcards: [] if config.get("drop") == rule else [path]

        rule future:
            input: gate("future", "future_gate")
            output: "f.txt"
            shell: "touch {output}"

        rule current:
            input: gate("current", "now_gate")
            output: "c.txt"
            shell: "touch {output}"

        rule dropped:
            input: gate("dropped", "now_gate")
            output: "d.txt"
            shell: "touch {output}"
        """,
        future_gate=FAR_FUTURE,
        now_gate=time.time(),
        f__txt=time.time() - 60,
    )
    first = snakemake(path, "--keep-going", "f.txt", "c.txt", "d.txt", check=False)
    assert jobs(first) == ["current", "dropped", "future"]
    # A job runs when an input is newer than its outputs, but afterwards Snakemake checks
    # that every output is at least as new as the newest input (clock skew guard, whether
    # ancient() or not): a far-future input fails the job, and its outputs are deleted.
    assert first.returncode != 0
    assert "Output f.txt has older modification time" in log(first)
    assert not (path / "f.txt").exists()
    # A gate touched at parse time works: listed, its job reruns every time; no longer listed,
    # nothing reruns (the set of inputs changed, which mtime-only triggers ignore).
    again = planned(path, "c.txt", "d.txt", config={"drop": "dropped"})
    assert rules(again) == ["current"]


def test_ancient_consumer_of_rerun_producer_needs_its_marker(tmp_path: Path) -> None:
    """Snakemake issue #4166."""
    now = time.time()
    path = workflow(
        tmp_path,
        """
        rule producer:
            output: "a.txt", touch("a.done")
            shell: "touch {output}"

        rule ancient_only:
            input: ancient("a.txt")
            output: "b.txt"
            shell: "touch {output}"

        rule with_marker:
            input: ancient("a.txt"), "a.done"
            output: "c.txt"
            shell: "touch {output}"
        """,
        a__txt=now - 60,
        b__txt=now,
        c__txt=now,
    )
    touch(path / "a.done", OLD, text="")  # as touch() leaves it: empty
    found = planned(path, "b.txt", "c.txt", forcerun={"producer"})
    assert rules(found) == ["producer", "with_marker"]
    assert "Input files updated by another job" in "\n".join(job.reason for job in found)


def test_markers_missing_old_and_at_zero(tmp_path: Path) -> None:
    now = time.time()
    path = workflow(
        tmp_path,
        """
        GATED = {"stale_old", "stale_zero"}
        for stage in ["via_all_missing", "by_name_missing", "by_name_old", *GATED]:
            rule:
                name: stage
                input: ancient("in.txt"), *(["gate"] if stage in GATED else [])
                output: f"{stage}.txt", touch(f"{stage}.done")
                shell: "touch {output}"

        rule all:
            input: "via_all_missing.txt", "stale_old.txt", "stale_zero.txt"
        """,
        in__txt=now,
        gate=FAR_FUTURE,
        via_all_missing__txt=now - 60,
        by_name_missing__txt=now - 60,
        by_name_old__txt=now - 60,
        by_name_old__done=OLD,
        stale_old__txt=now - 60,
        stale_old__done=OLD,
        stale_zero__txt=now - 60,
        stale_zero__done=0,
    )
    # A missing marker reruns a job whose rule is a target, not one only `all` needs. A
    # marker at epoch+1 is harmless; one at 0 makes Snakemake skip its mtime comparison, so
    # stale_zero ignores its far-future gate.
    found = planned(path, "all", "by_name_missing", "by_name_old")
    assert rules(found) == ["all", "by_name_missing", "stale_old"]


def test_input_functions_see_dag_settings(tmp_path: Path) -> None:
    path = workflow(
        tmp_path,
        """
        import json

        json.dump({"at_parse": workflow.dag_settings}, open("parse.json", "w"))

        def probe(wildcards):
            settings = workflow.dag_settings
            seen = {
                "rerun_triggers": sorted(t.name.lower() for t in settings.rerun_triggers),
                "max_checksum_file_size": settings.max_checksum_file_size,
                "forcerun": sorted(settings.forcerun),
            }
            json.dump(seen, open("seen.json", "w"))
            return []

        rule consumer:
            input: probe, "a.txt"
            output: "b.txt"
            shell: "touch {output}"

        rule a:
            output: "a.txt"
            shell: "touch {output}"
        """,
    )
    planned(path, "b.txt", forcerun={"a"})
    assert json.loads((path / "parse.json").read_text()) == {"at_parse": None}
    seen = json.loads((path / "seen.json").read_text())
    assert seen == {"rerun_triggers": ["mtime"], "max_checksum_file_size": 0, "forcerun": ["a"]}


def test_script_gets_empty_named_input_and_directory_log(tmp_path: Path) -> None:
    path = workflow(
        tmp_path,
        """
        rule a:
            input: data="in.txt", extra=lambda wildcards: []
            output: "seen.json"
            params: value=lambda wildcards: 3
            log: logs=directory("logs/a"), main="logs/a.log"
            script: "probe.py"
        """,
        in__txt=time.time(),
    )
    (path / "probe.py").write_text(
        "import json\n"
        "s = snakemake\n"
        "seen = {'input': dict(s.input.items()), 'value': s.params.value, 'log': s.log.logs}\n"
        "json.dump(seen, open(s.output[0], 'w'))\n"
    )
    assert jobs(snakemake(path, "seen.json")) == ["a"]
    seen = json.loads((path / "seen.json").read_text())
    assert seen == {"input": {"data": "in.txt", "extra": []}, "value": 3, "log": "logs/a"}


def test_main_process_parses_with_is_main_process(tmp_path: Path) -> None:
    path = workflow(
        tmp_path,
        """
        open("main.txt", "w").write(str(workflow.is_main_process))

        rule a:
            output: "a.txt"
            shell: "touch {output}"
        """,
    )
    planned(path)
    assert (path / "main.txt").read_text() == "True"


def test_empty_inputs_are_checksummed_even_at_threshold_zero(tmp_path: Path) -> None:
    path = workflow(
        tmp_path,
        """
        for name in ["empty", "filled"]:
            rule:
                name: name
                input: f"{name}.in"
                output: f"{name}.out"
                shell: "touch {output}"
        """,
        filled__in=time.time(),
    )
    touch(path / "empty.in", time.time(), text="")
    assert jobs(snakemake(path, "empty.out", "filled.out")) == ["empty", "filled"]
    later = time.time() + 60
    touch(path / "empty.in", later, text="")
    touch(path / "filled.in", later)
    # Both inputs are newer than the outputs, with unchanged content. max-checksum-file-size 0
    # still admits 0-byte files: the empty input's checksum matches the one recorded, so its
    # job does not rerun. Gates must not be empty.
    assert rules(planned(path, "empty.out", "filled.out")) == ["filled"]


def test_sigint_to_snakemake_alone_leaves_its_job_running(tmp_path: Path) -> None:
    path = workflow(
        tmp_path,
        """
        import signal

        onstart:
            handler = signal.getsignal(signal.SIGTERM)
            open("onstart.txt", "w").write(getattr(handler, "__name__", str(handler)))

        rule slow:
            output: "slow.txt"
            shell: "touch started.txt; sleep 4; echo finished > after.txt; touch {output}"
        """,
    )
    command = [str(BIN / "snakemake"), "--cores", "1", *MTIME_ONLY, "slow.txt"]
    process = subprocess.Popen(command, cwd=path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not (path / "started.txt").exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode != 0
    # Snakemake waited for the job it did not stop: the job ran to its end
    assert (path / "after.txt").read_text() == "finished\n"
    assert (path / "onstart.txt").read_text() == "exit_gracefully"


def test_each_behaviour_has_a_test() -> None:
    """BEHAVIOURS lists the tests above, in order."""
    tests = [name for name in globals() if name.startswith("test_")]
    assert tests.index("test_each_behaviour_has_a_test") == len(BEHAVIOURS)


# ---- the version check -------------------------------------------------------------------


@pytest.mark.parametrize("accepted", ["9.27.0", "9.27.1", "9.27.0.post1", "9.27.12"])
def test_tested_versions_pass(accepted: str) -> None:
    check_snakemake_version(accepted)


@pytest.mark.parametrize(
    "rejected", ["9.26.3", "9.28.0", "9.28.0rc1", "10.0.0", "8.27.1", "not-a-version"]
)
def test_untested_versions_are_refused_in_one_line(rejected: str) -> None:
    with pytest.raises(LoramillError) as refused:
        check_snakemake_version(rejected)
    message = str(refused.value)
    assert "\n" not in message
    assert f"Snakemake {rejected} " in message
    assert f">={TESTED[0]}, <{TESTED[1]}" in message
    assert f"make install` (snakemake=={PINNED})" in message


def test_installed_and_pinned_snakemake_are_in_the_tested_range() -> None:
    check_snakemake_version(version("snakemake"))
    pins = (REPO / "constraints.txt").read_text()
    assert f"\nsnakemake=={PINNED}\n" in f"\n{pins}"
    check_snakemake_version(PINNED)
