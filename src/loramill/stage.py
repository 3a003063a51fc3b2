"""Running a stage from a Snakemake ``script:``: logging to the rule's log file and turning
input/config problems into one clear line instead of a traceback."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

from loramill import LoramillError
from loramill.config import dataset_config
from loramill.freshness import job_components, run_keyed
from loramill.hashing import DEFAULT_DB, HashCache
from loramill.stages import STAGES

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


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


def run(
    snakemake: Any,
    function: Callable[..., Any],
    from_fingerprint: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    **kwargs: Any,
) -> Any:
    """Call ``function(**kwargs)`` for a Snakemake job and report failures as one line.

    ``from_fingerprint`` maps the job's fingerprint components to further keyword arguments
    (the train stage keys its resumable state on them)."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if snakemake.log:
        handlers.append(logging.FileHandler(snakemake.log[0], mode="w", encoding="utf-8"))
    logging.basicConfig(level=logging.INFO, format=FORMAT, handlers=handlers, force=True)
    logging.captureWarnings(True)
    quiet_libraries()
    warnings.filterwarnings("ignore", category=FutureWarning)
    job = f"{snakemake.rule} {', '.join(str(v) for v in snakemake.wildcards)}".strip()

    def compute(components: dict[str, Any]) -> Any:
        extra = from_fingerprint(components) if from_fingerprint else {}
        return function(**kwargs, **extra)

    try:
        if snakemake.rule not in STAGES:
            return function(**kwargs)
        ds = snakemake.wildcards.ds
        settings = dataset_config(snakemake.config, ds)
        if not snakemake.config.get("content_keyed_reruns", True):
            # Only a stage that asks for its fingerprint pays for hashing its inputs.
            if from_fingerprint is None:
                return function(**kwargs)
            hashes = HashCache(DEFAULT_DB)
            return compute(job_components(STAGES[snakemake.rule], ds, settings, hashes))
        logger = logging.getLogger("loramill")
        return run_keyed(snakemake.rule, ds, settings, compute, logger)
    except LoramillError as error:
        logging.getLogger("loramill").error("%s", error)
        sys.exit(f"{job}: {error}")
