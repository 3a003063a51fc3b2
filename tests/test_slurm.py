"""The demo through Snakemake's Slurm executor on a real single-node Slurm (issue #16).

Every job is a Slurm job that re-parses the workflow on its node; only the submitting process
decides what is stale. The Slurm run must leave what a local run leaves (bit-identical
adapters, the same locks), a second invocation must submit nothing, and a training job killed
by Slurm must resume on resubmission. CI starts the cluster with .ci/start-slurm (root); where
no Slurm answers, these tests are skipped and say so.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time

import pytest
from conftest import BIN, digest, edit_config, run_tool

# what the README's cluster command adds here: a cluster without an accounting database
# (job states from squeue), and a quick status poll for a test
SLURM = [
    "--workflow-profile", "profiles/slurm", "--slurm-status-command", "squeue",
    "--slurm-init-seconds-before-status-checks", "1", "--seconds-between-status-checks", "2",
]  # fmt: skip


def slurm_answers() -> bool:
    if not shutil.which("sinfo"):
        return False
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return states.returncode == 0 and bool({"idle", "mixed"} & set(states.stdout.split()))


pytestmark = [
    pytest.mark.workflow,
    pytest.mark.skipif(
        not slurm_answers(),
        reason="no idle Slurm node answers `sinfo`; start one with .ci/start-slurm (root)",
    ),
]


# One image dataset's chain and the text chain (the small build's other image dataset would
# only repeat the first's six jobs, at Slurm's polling pace).
DATASETS = ("wide_bands", "station_procedures")
TARGETS = ["exports/wide_bands.safetensors", "grids/wide_bands.png",
           "exports/station_procedures", "evaluations/station_procedures.html"]  # fmt: skip


def submitted(result) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", result.stdout + result.stderr)


@pytest.fixture(scope="module")
def runs(small_build, tmp_path_factory):
    """Two datasets of the small build through Slurm, from a copy of the checkout as it was
    before the session's local build (conftest's small_build, shared with test_reruns)."""
    cluster = tmp_path_factory.mktemp("cluster") / "repo"
    shutil.copytree(small_build.before, cluster, symlinks=True)
    result = run_tool("snakemake", *SLURM, *TARGETS, cwd=cluster)
    return small_build.built, cluster, result


def outputs(root, folder: str) -> list:
    """The files a build left in ``folder`` for DATASETS, less what publishing the local build
    added (DVC's .dvc records and the .gitignore beside them)."""
    return sorted(
        p.relative_to(root)
        for p in (root / folder).rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix != ".dvc"
        and p.relative_to(root / folder).parts[0].startswith(DATASETS)
    )


def test_the_cluster_run_leaves_what_a_local_run_leaves(runs):
    local, cluster, result = runs
    assert len(submitted(result)) == 10  # 6 image stages, 4 text stages
    exports = outputs(local, "exports")
    assert exports and exports == outputs(cluster, "exports")
    for path in exports:
        assert digest(cluster / path) == digest(local / path), path
    locks = outputs(local, "locks")
    assert len(locks) == 10 and locks == outputs(cluster, "locks")
    for path in locks:
        ours, theirs = (json.loads((root / path).read_text()) for root in (local, cluster))
        assert (ours["fingerprint"], ours["outputs"]) == (theirs["fingerprint"], theirs["outputs"])


def test_a_second_invocation_submits_nothing(runs):
    _, cluster, _ = runs
    again = run_tool("snakemake", *SLURM, *TARGETS, cwd=cluster)
    assert submitted(again) == []
    assert "Nothing to be done" in again.stdout + again.stderr


def train_steps(root, steps: int) -> None:
    edit_config(root, lambda c: c["datasets"]["wide_bands"].update(
        train={"max_train_steps": steps, "save_steps": 2}))  # fmt: skip


def test_a_training_job_killed_by_slurm_resumes_on_resubmission(runs, tmp_path):
    _, cluster, _ = runs
    root = shutil.copytree(cluster, tmp_path / "repo", symlinks=True)
    # A run that cannot end before the kill: 100000 steps take hours here, the kill comes
    # two steps past the state it continues (the build's 2-step run).
    train_steps(root, 100_000)
    target = "results/wide_bands/checkpoints"
    before = saved_states(root)
    first = subprocess.Popen([str(BIN / "snakemake"), *SLURM, target], cwd=root, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    job = wait_for_saved_state(root, before)
    subprocess.run(["scancel", job], check=True)
    output, _ = first.communicate(timeout=300)
    assert first.returncode != 0, output
    saved = max(step(path) for path in saved_states(root) - before)
    assert 2 < saved < 100_000
    # Resubmitted (a run of the same options, stopping two steps past the saved state: it
    # continues that state as the same run would, see loramill.train.state).
    train_steps(root, saved + 2)
    resumed = run_tool("snakemake", *SLURM, target, cwd=root)
    assert len(submitted(resumed)) == 1
    log = (root / "logs" / "train" / "wide_bands.log").read_text()
    assert f"resumed from step {saved}\n" in log, log
    assert (root / target / f"step-{saved + 2:06d}.safetensors").is_file()


def saved_states(root) -> set:
    return set((root / ".cache" / "train").glob("*/state/step-*.pt"))


def step(state) -> int:
    return int(state.stem.removeprefix("step-"))


def wait_for_saved_state(root, before: set, timeout: float = 240) -> str:
    """The Slurm id of the running train job, once it has saved a resumable state past the
    2-step run it continues (a longer run of the same options continues a shorter one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(step(path) > 2 for path in saved_states(root) - before):
            jobs = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"],
                                  capture_output=True, text=True).stdout.split("\n")  # fmt: skip
            running = [line.split()[0] for line in jobs if "rule_train_" in line]
            if running:
                return running[0]
        time.sleep(0.5)
    raise AssertionError("no train job saved its state in time")
