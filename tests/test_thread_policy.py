"""Jobs run with OpenMP threads that sleep while they wait (issue #25, item 12): beside other
busy processes, spinning threads made a training step 10-100x slower (bench/thread_policy.py).
"""

from __future__ import annotations

import shutil

import pytest
import yaml
from conftest import REPO, run_tool

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

Path(snakemake.output[0]).write_text(os.environ.get("OMP_WAIT_POLICY", "unset"))
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


def job_policy(root, monkeypatch, value: str | None) -> str:
    """OMP_WAIT_POLICY as a job sees it when Snakemake starts with ``value`` (None: unset)."""
    if value is None:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)  # conftest sets it for the suite
    else:
        monkeypatch.setenv("OMP_WAIT_POLICY", value)
    (root / "omp_probe.txt").unlink(missing_ok=True)
    run_tool("snakemake", "--cores", "1", "omp_probe.txt", cwd=root)
    return (root / "omp_probe.txt").read_text()


def test_jobs_wait_passively_unless_the_user_says_otherwise(workflow, monkeypatch):
    assert job_policy(workflow, monkeypatch, None) == "PASSIVE"
    assert job_policy(workflow, monkeypatch, "ACTIVE") == "ACTIVE"
