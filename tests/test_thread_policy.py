"""Jobs run with OpenMP threads that spin briefly, then sleep, while they wait (issues #25 and
#28): beside other busy processes, threads that spin long made a training step 10-37x slower,
and threads that sleep at once cost a tenth of a quiet step (bench/thread_policy.py).
"""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import REPO, run_tool

from loramill import openmp
from loramill.demo.images import generate_dataset
from loramill.demo.text import procedure_records, write_jsonl

pytestmark = pytest.mark.workflow

# A job of the workflow like every script: job, reporting the environment it was started with.
PROBE_RULE = """

rule omp_probe:
    output:
        "omp_probe.txt",
    script:
        "omp_probe.py"
"""
PROBE_SCRIPT = """import os
from pathlib import Path

names = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
Path(snakemake.output[0]).write_text(" ".join(os.environ.get(n, "unset") for n in names))
"""


@pytest.fixture(scope="module")
def workflow(tmp_path_factory):
    """The workflow with its datasets' data (two images each), plus the probe rule."""
    root = tmp_path_factory.mktemp("wf")
    for name in ("Snakefile", "rules", "scripts", "config", "profiles", "envs", "src"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, root / name)
    (root / "models").symlink_to(REPO / "models")
    datasets = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["datasets"]
    for ds, entry in datasets.items():
        if (entry or {}).get("task") == "text":
            write_jsonl(procedure_records(4), root / "data" / ds / "train.jsonl")
        else:
            generate_dataset(root / "data" / ds, "circles", 2)
    with (root / "Snakefile").open("a") as snakefile:
        snakefile.write(PROBE_RULE)
    (root / "omp_probe.py").write_text(PROBE_SCRIPT)
    return root


def job_policy(root, monkeypatch, **values: str) -> str:
    """OMP_WAIT_POLICY and GOMP_SPINCOUNT as a job sees them when Snakemake starts with
    ``values`` of them set (the others unset)."""
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(name, raising=False)  # conftest sets OMP_WAIT_POLICY for the suite
        if name in values:
            monkeypatch.setenv(name, values[name])
    (root / "omp_probe.txt").unlink(missing_ok=True)
    run_tool("snakemake", "--cores", "1", "omp_probe.txt", cwd=root)
    return (root / "omp_probe.txt").read_text()


def test_jobs_spin_briefly_then_sleep_unless_the_user_says_otherwise(workflow, monkeypatch):
    assert job_policy(workflow, monkeypatch) == f"unset {openmp.SPIN_COUNT}"
    assert job_policy(workflow, monkeypatch, OMP_WAIT_POLICY="PASSIVE") == "PASSIVE unset"
    assert job_policy(workflow, monkeypatch, GOMP_SPINCOUNT="300000") == "unset 300000"
