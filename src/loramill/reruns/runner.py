"""Running a stage's job from a Snakemake ``script:``.

The job logs to the rule's log file, turns input and config problems into one clear line
instead of a traceback, and, for content-keyed stages, fingerprints what it received: when
the run-cache holds that fingerprint the outputs are restored instead of recomputed (a revert
does not retrain; a stage whose inputs came out byte-identical after an upstream rerun is
restored in milliseconds), and either way it writes the stage's lock.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from loramill import LoramillError
from loramill.config import dataset_config
from loramill.content_params import BY_CONTENT
from loramill.hashing import DEFAULT_DB, HashCache
from loramill.reruns import failures, run_cache
from loramill.reruns.fingerprints import Job, components, fingerprint
from loramill.reruns.locks import write_lock
from loramill.reruns.staleness import digests

# Calling a stage's function and recording its lock is not what the stage computes: its
# edits must not rerun every stage (loramill.reruns.code reads this, wherever this module is).
__fingerprinted__ = False
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# The rule helpers' names for a stage's gate input and marker output (rules/common.smk).
GATE, DONE = "gate", "done"


def quiet_libraries() -> None:
    """Progress bars and load reports belong to interactive use, not to job logs.

    Set through the environment so stages that never import the ML stack stay fast.
    """
    for name, value in {
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "DIFFUSERS_VERBOSITY": "error",
        "TRANSFORMERS_VERBOSITY": "error",
        "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    }.items():
        os.environ.setdefault(name, value)


def paths(value: Any) -> list[str]:
    """A named input or output as a list of paths (Snakemake gives a str or a list)."""
    return [str(value)] if isinstance(value, str) else [str(v) for v in value]


def stage_name(snakemake: Any) -> str:
    """The stage a job runs: its done marker's name (rule_jobs.stage_of), else its rule's."""
    marker = snakemake.output.get(DONE)
    return snakemake.rule if marker is None else Path(str(marker)).name


def received(snakemake: Any) -> Job:
    """What this job received, in the form the planner evaluates from the rule."""
    settings = dataset_config(snakemake.config, snakemake.wildcards.ds)
    return Job(
        rule=stage_name(snakemake),
        script=Path(snakemake.scriptdir) / f"{stage_name(snakemake)}.py",
        params=dict(snakemake.params.items()),
        inputs={k: paths(v) for k, v in snakemake.input.items() if k != GATE},
        dataset_root=settings["path"],
    )


def setup_logging(snakemake: Any) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format=FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)
    quiet_libraries()
    warnings.filterwarnings("ignore", category=FutureWarning)


def run(
    snakemake: Any,
    function: Callable[..., Any],
    from_fingerprint: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **kwargs: Any,
) -> Any:
    """Call ``function(**kwargs)`` for a Snakemake job and report failures as one line.

    ``from_fingerprint`` maps the job's fingerprint components to further keyword arguments
    (the train stage keys its resumable state on them)."""
    setup_logging(snakemake)
    name = f"{snakemake.rule} {', '.join(str(v) for v in snakemake.wildcards)}".strip()
    try:
        if snakemake.output.get(DONE) is None:  # not a content-keyed stage
            result = function(**kwargs)
        else:
            result = run_keyed(snakemake, function, from_fingerprint, kwargs)
    except LoramillError as error:
        fail(name, str(error))
    except KeyboardInterrupt:  # before or after the training loop, which stops by itself
        fail(name, "interrupted (SIGINT); rerun the same command to continue")
    except Exception as error:  # a bug: its traceback, and one line for the summary
        logging.getLogger("loramill").exception("unexpected error")
        fail(name, f"unexpected {type(error).__name__}: {error} (traceback in the log)")
    failures.clear(name)
    return result


def fail(name: str, reason: str) -> NoReturn:
    """End the job with one line on the terminal, in its log and in the run's summary."""
    logging.getLogger("loramill").error("%s", reason)
    failures.record(name, reason)
    sys.exit(f"{name}: {reason}")


def run_keyed(
    snakemake: Any,
    function: Callable[..., Any],
    from_fingerprint: Callable[[dict[str, Any]], dict[str, Any]] | None,
    kwargs: dict[str, Any],
) -> Any:
    keyed = snakemake.config.get("content_keyed_reruns", True)
    if not keyed and from_fingerprint is None:
        return function(**kwargs)  # only a stage that asks for its fingerprint pays for it
    job = received(snakemake)
    unsafe = bool(job.params.get("allow_unsafe_weights"))
    for key, by_content in BY_CONTENT.items():  # a hub id is fingerprinted by its commit
        if by_content.fetch and job.params.get(key):
            by_content.fetch(job.params[key], unsafe)
    hashes = HashCache(DEFAULT_DB)
    present = lambda name, path: hashes.digest(path) if os.path.exists(path) else "missing"  # noqa: E731
    parts = components(job, present, hashes)
    key = fingerprint(parts)
    extra = from_fingerprint(parts) if from_fingerprint else {}
    outputs = {k: str(v) for k, v in snakemake.output.items() if k != DONE}
    kept = {**outputs, **{k: str(v) for k, v in snakemake.log.items()}}
    if keyed and run_cache.restore(key, kept):
        stage = (stage_name(snakemake), snakemake.wildcards.ds, key[:12])
        logging.getLogger("loramill").info("%s %s: restored from the run-cache (%s)", *stage)
    else:
        function(**kwargs, **extra)
        if keyed:
            run_cache.store(key, kept)
    if keyed:
        write_lock(
            snakemake.wildcards.ds, stage_name(snakemake), key, parts, digests(outputs, hashes)
        )
    hashes.save()
