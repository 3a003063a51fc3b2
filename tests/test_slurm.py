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
from conftest import BIN, clone_checkout, run_tool
from test_reruns import SMALL, edit_config

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


def small(root):
    def change(config):
        config["device"] = "cpu"  # the test cluster has no GPU: no job may ask for one
        for section, values in SMALL.items():
            config[section].update(values)

    edit_config(root, change)
    return root


def checkout(path):
    root = clone_checkout(path)
    run_tool("dvc", "pull", cwd=root)
    return small(root)


def submitted(result) -> list[str]:
    return re.findall(r"submitted with SLURM jobid (\d+)", result.stdout + result.stderr)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    local = checkout(tmp_path_factory.mktemp("local") / "repo")
    run_tool("snakemake", "--cores", "2", "train_all", cwd=local)
    cluster = checkout(tmp_path_factory.mktemp("cluster") / "repo")
    result = run_tool("snakemake", *SLURM, "train_all", cwd=cluster)
    return local, cluster, result


def test_the_cluster_run_leaves_what_a_local_run_leaves(runs):
    local, cluster, result = runs
    assert len(submitted(result)) == 16  # 6 stages × 2 image datasets, 4 text stages
    exports = sorted(p.relative_to(local) for p in (local / "exports").rglob("*") if p.is_file()
                     and not p.name.startswith("."))  # fmt: skip
    assert exports
    for path in exports:
        assert (cluster / path).read_bytes() == (local / path).read_bytes(), path
    locks = sorted(p.relative_to(local) for p in (local / "locks").rglob("*.json"))
    assert locks == sorted(p.relative_to(cluster) for p in (cluster / "locks").rglob("*.json"))
    for path in locks:
        ours, theirs = (json.loads((root / path).read_text()) for root in (local, cluster))
        assert (ours["fingerprint"], ours["outputs"]) == (theirs["fingerprint"], theirs["outputs"])


def test_a_second_invocation_submits_nothing(runs):
    _, cluster, _ = runs
    again = run_tool("snakemake", *SLURM, "train_all", cwd=cluster)
    assert submitted(again) == []
    assert "Nothing to be done" in again.stdout + again.stderr


def test_a_training_job_killed_by_slurm_resumes_on_resubmission(runs, tmp_path):
    _, cluster, _ = runs
    root = shutil.copytree(cluster, tmp_path / "repo", symlinks=True)
    edit_config(root, lambda c: c["datasets"]["wide_bands"].update(
        train={"max_train_steps": 400, "save_steps": 20}))  # fmt: skip
    target = "results/wide_bands/checkpoints"
    before = saved_states(root)
    first = subprocess.Popen([str(BIN / "snakemake"), *SLURM, target], cwd=root, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    job = wait_for_saved_state(root, before)
    subprocess.run(["scancel", job], check=True)
    output, _ = first.communicate(timeout=300)
    assert first.returncode != 0, output
    log = root / "logs" / "train" / "wide_bands.log"
    resumed = run_tool("snakemake", *SLURM, target, cwd=root)
    assert len(submitted(resumed)) == 1
    step = re.search(r"resumed from step (\d+)", log.read_text())
    assert step and int(step.group(1)) >= 20, log.read_text()
    assert (root / target / "step-000400.safetensors").is_file()


def saved_states(root) -> set:
    return set((root / ".cache" / "train").glob("*/state/step-*.pt"))


def wait_for_saved_state(root, before: set, timeout: float = 240) -> str:
    """The Slurm id of the running train job, once it has saved a new resumable state past
    the 2-step run it continues (a longer run of the same options continues a shorter one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = saved_states(root) - before
        if any(int(p.stem.removeprefix("step-")) >= 20 for p in new):
            jobs = subprocess.run(["squeue", "-h", "-t", "RUNNING", "-o", "%i %k"],
                                  capture_output=True, text=True).stdout.split("\n")  # fmt: skip
            running = [line.split()[0] for line in jobs if "rule_train_" in line]
            if running:
                return running[0]
        time.sleep(0.5)
    raise AssertionError("no train job saved its state in time")
