"""What Snakemake would run, asked in the test's own process through Snakemake's API: the
workflow parsed and its DAG built, no job started and no interpreter to start (a fraction of
the time of `snakemake -n`)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import yaml
from snakemake.api import SnakemakeApi
from snakemake.settings import types
from snakemake.settings.enums import Quietness, RerunTrigger


class Planned(NamedTuple):
    rule: str
    ds: str | None  # the dataset wildcard; None for a target rule
    inputs: tuple[str, ...]


@contextlib.contextmanager
def restored_process_state() -> Iterator[None]:
    """The workflow adds its source folder to sys.path and PYTHONPATH, and a log handler."""
    path, pythonpath = sys.path[:], os.environ.get("PYTHONPATH")
    handlers = logging.getLogger("loramill").handlers[:]
    cwd = os.getcwd()
    try:
        yield
    finally:
        sys.path[:] = path
        os.environ.pop("PYTHONPATH", None)
        os.environ.update({} if pythonpath is None else {"PYTHONPATH": pythonpath})
        logging.getLogger("loramill").handlers[:] = handlers
        os.chdir(cwd)


@contextlib.contextmanager
def parsed(
    root: Path, resources: types.ResourceSettings, config: types.ConfigSettings
) -> Iterator[tuple[io.StringIO, object]]:
    """The workflow in ``root`` parsed through Snakemake's API, quietly, with what it prints to
    stderr caught and this process's state restored afterwards."""
    stderr = io.StringIO()
    quiet = types.OutputSettings(quiet={Quietness.ALL})
    with restored_process_state(), contextlib.redirect_stderr(stderr), SnakemakeApi(quiet) as api:
        yield (
            stderr,
            api.workflow(
                resource_settings=resources,
                config_settings=config,
                storage_settings=types.StorageSettings(),
                workflow_settings=types.WorkflowSettings(),
                deployment_settings=types.DeploymentSettings(),
                snakefile=root / "Snakefile",
                workdir=root,
            ),
        )


def planned_jobs(
    root: Path,
    *forcerun: str,
    targets: Sequence[str] = ("train_all",),
    configfiles: Sequence[Path] = (),
) -> tuple[str, list[Planned]]:
    """Every job Snakemake would run for ``targets``, as `snakemake -n --configfile …` with the
    workflow profile's settings plans it, and what the workflow printed to stderr."""
    resources = types.ResourceSettings(cores=1)
    config = types.ConfigSettings(configfiles=[Path(f) for f in configfiles])
    with parsed(root, resources, config) as (stderr, workflow_api):
        profile = yaml.safe_load((root / "profiles" / "default" / "config.yaml").read_text())
        settings = types.DAGSettings(
            targets=set(targets),
            forcerun=set(forcerun),
            rerun_triggers={RerunTrigger[t.upper()] for t in profile["rerun-triggers"]},
            max_checksum_file_size=profile["max-checksum-file-size"],
        )
        workflow_api.dag(settings).execute_workflow(executor="dryrun")
        planned = workflow_api._workflow.dag.needrun_jobs(exclude_finished=False)
        found = [
            Planned(job.rule.name, job.wildcards.get("ds"), tuple(map(str, job.input)))
            for job in planned
        ]
    return stderr.getvalue(), found


def plan(root: Path, *forcerun: str) -> tuple[str, set[tuple[str, str]]]:
    """What Snakemake would run for train_all: what the workflow printed to stderr, and the
    (rule, dataset) of every job it plans."""
    stderr, jobs = planned_jobs(root, *forcerun)
    return stderr, {(job.rule, job.ds) for job in jobs if job.ds is not None}


class DryRunJob(NamedTuple):
    rule: str
    wildcards: dict[str, str]
    resources: dict[str, object]  # as `snakemake -n` lists them under `resources:`
    reason: str  # as `snakemake -n` prints it under `reason:`


def dry_run(
    root: Path,
    *targets: str,
    config: dict | None = None,
    dag: dict | None = None,
    resources: dict | None = None,
    cores: int = 1,
) -> tuple[str, list[DryRunJob]]:
    """`snakemake -n --cores CORES TARGETS` in ``root`` (any Snakefile, no profile read):
    ``config`` as --config, ``dag`` DAGSettings fields (forcerun, forceall, rerun_triggers,
    max_checksum_file_size …), ``resources`` as --resources. The CLI does this through the
    same API, so the jobs are the ones it would list; what the workflow printed to stderr."""
    resource_settings = types.ResourceSettings(cores=cores, resources=resources or {})
    config_settings = types.ConfigSettings(config=config or {})
    with parsed(root, resource_settings, config_settings) as (stderr, workflow_api):
        dag_api = workflow_api.dag(types.DAGSettings(targets=set(targets), **(dag or {})))
        dag_api.execute_workflow(executor="local", pseudo_executor="dryrun")
        graph = workflow_api._workflow.dag
        found = [
            DryRunJob(job.rule.name, dict(job.wildcards), dict(job.resources.items()),
                      str(graph.reason(job)))
            for job in graph.needrun_jobs(exclude_finished=False)
        ]  # fmt: skip
    return stderr.getvalue(), found
