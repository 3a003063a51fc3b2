"""A content-keyed Snakemake rule, read as a stage: what its job will receive, per dataset.

The planner needs, before any job runs, what each job will be given. Rather than describing
stages a second time, this evaluates the rule itself for a dataset — its params functions,
its input functions and patterns, its outputs — the way Snakemake will when it creates the
job, so the rule stays the one description.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from snakemake.io import apply_wildcards
from snakemake.iocontainers import Wildcards

from loramill import LoramillError
from loramill.reruns.fingerprints import Job
from loramill.reruns.gates import done_marker
from loramill.reruns.runner import DONE, GATE, paths
from loramill.reruns.staleness import Stage


def _evaluate(value: Any, wildcards: Wildcards) -> Any:
    """A rule item for one job, as Snakemake makes it: a function's result as returned,
    a string as a pattern filled with the wildcards."""
    if callable(value):
        return value(wildcards)
    if isinstance(value, str):
        return apply_wildcards(value, wildcards) if "{" in value else str(value)
    return value


def _named(items: Any, wildcards: Wildcards, skip: str) -> dict[str, Any]:
    return {name: _evaluate(value, wildcards) for name, value in items if name != skip}


def stage_of(rule: Any) -> str:
    """The stage a rule runs: the name its done marker ends with (one stage may have a rule
    per kind of dataset, such as the export of networks without a diffusers-format file)."""
    return str(rule.output.get(DONE)).rsplit("/", 1)[-1]


def _check(rule: Any) -> Path:
    """The conventions a stage rule follows, so the job can find the same facts."""
    if rule.input.get(GATE) is None or rule.output.get(DONE) is None:
        raise LoramillError(f"rule {rule.name}: needs gate={GATE}(…) and done={DONE}(…)")
    stage = stage_of(rule)
    script = Path(rule.basedir.get_path_or_uri(secret_free=True)) / (rule.script or "")
    expected = f"scripts/{stage}.py"
    if not script.is_file() or not script.resolve().as_posix().endswith(expected):
        raise LoramillError(f"rule {rule.name}: a content-keyed stage runs {expected}")
    if rule.name != stage and not rule.name.startswith(stage + "_"):
        raise LoramillError(
            f"rule {rule.name}: its marker {rule.output.get(DONE)} names another stage"
        )
    return script


def rule_stage(rules: list[Any], datasets: dict[str, dict[str, Any]]) -> Stage:
    """The stage ``rules`` run (each for the datasets its wildcard constraints admit), for the
    datasets of the config."""
    scripts = {rule.name: _check(rule) for rule in rules}
    stage = stage_of(rules[0])

    def rule_for(ds: str) -> Any:
        marker = done_marker(ds, stage)
        return next((rule for rule in rules if rule.is_producer(marker)), rules[0])

    def job(ds: str) -> Job:
        wildcards = Wildcards(fromdict={"ds": ds})
        rule = rule_for(ds)
        return Job(
            rule=stage,
            script=scripts[rule.name],
            params=_named(rule.params.items(), wildcards, skip=""),
            inputs={k: paths(v) for k, v in _named(rule.input.items(), wildcards, GATE).items()},
            dataset_root=datasets[ds]["path"],
        )

    def outputs(ds: str) -> dict[str, str]:
        wildcards = Wildcards(fromdict={"ds": ds})
        return {k: str(v) for k, v in _named(rule_for(ds).output.items(), wildcards, DONE).items()}

    def applies(ds: str) -> bool:
        return any(rule.is_producer(done_marker(ds, stage)) for rule in rules)

    return Stage(stage, job, outputs, applies)
