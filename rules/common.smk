# Configuration, the dataset table and input helpers shared by every rule.

import os
import sys
from pathlib import Path

from snakemake.settings.enums import RerunTrigger
from snakemake.utils import validate

# Jobs import the package from the checkout, with or without `pip install` (conda envs and
# cluster jobs too: envvars passes PYTHONPATH on to remote executors).
SRC = str(Path(workflow.basedir) / "src")
sys.path.insert(0, SRC)
os.environ["PYTHONPATH"] = os.pathsep.join(
    filter(None, [SRC, os.environ.get("PYTHONPATH")])
)


envvars:
    "PYTHONPATH",


from loramill import LoramillError
from loramill.caption import captioner_class
from loramill.config import check_replaced_keys, dataset_config, describe, grid_prompts
from loramill.devices import uses_gpu
from loramill.freshness import assess, done_marker, write_gates
from loramill.hashing import DEFAULT_DB, HashCache
from loramill.model import job_mem_mb, resolve_base_model
from loramill.stages import STAGES
from loramill.train_config import TrainConfig

SCHEMA = str(Path(workflow.basedir) / "config" / "config.schema.yaml")
ENV = "../envs/loramill.yaml"


def validate_config(data):
    validate(data, SCHEMA)


def check_dataset(ds, settings):
    """Problems a user can fix before any job runs: unknown captioner, train options that
    contradict each other, a missing init_from file, data not pulled."""
    try:
        captioner_class(settings["caption"])
        train = TrainConfig.from_dict(settings["train"])
        if settings["device"] == "cpu":
            train.check_device("cpu")
        if train.init_from and not Path(train.init_from).is_file():
            raise LoramillError(f"train.init_from: {train.init_from} is not a file")
    except LoramillError as error:
        raise LoramillError(f"config: datasets.{ds}.{error}") from None
    images = Path(settings["path"]) / "images"
    if not images.is_dir():
        raise LoramillError(
            f"dataset {ds}: {images} not found (new clone? run `dvc pull`)"
        )


def load_datasets():
    """Validate the config and return each dataset's effective settings; exit with one line."""
    try:
        check_replaced_keys(config)
        validate_config(config)
    except LoramillError as error:
        sys.exit(f"loramill: {error}")
    except Exception as error:
        sys.exit(f"loramill: {describe(error)}")
    try:
        resolve_base_model(config["base_model"])
        datasets = {}
        for ds in config["datasets"]:
            datasets[ds] = dataset_config(config, ds, validate_config)
            check_dataset(ds, datasets[ds])
        return datasets
    except LoramillError as error:
        sys.exit(f"loramill: {error}")


DATASETS = load_datasets()


# ---- content-keyed reruns (see src/loramill/freshness.py) ---------------------------------
# Rules read data inputs through keyed() (ancient: modification times never trigger a rerun),
# list gate(stage) among their inputs and done(stage) among their outputs. The gate file's
# mtime says whether the stage's fingerprint still matches its committed lock. Because
# Snakemake does not re-check a job whose ancient input's producer reruns (issue #4166), a
# consumer of a stage that will rerun also takes that stage's touch() marker. Only the main
# process decides; cluster jobs re-parse this file.

CONTENT_KEYED = config["content_keyed_reruns"]
PROFILE_HINT = (
    "content-keyed reruns need the workflow profile (profiles/default: rerun-triggers: mtime, "
    "max-checksum-file-size: 0), or Snakemake reruns by modification time; drop "
    "--workflow-profile none / --rerun-triggers / --max-checksum-file-size"
)
STALE = set()


def check_profile():
    # Snakemake only attaches the DAG settings after parsing, so this runs from the first
    # gate() input function instead of at parse time.
    settings = workflow.dag_settings
    if (
        set(settings.rerun_triggers) != {RerunTrigger.MTIME}
        or settings.max_checksum_file_size
    ):
        sys.exit(f"loramill: {PROFILE_HINT}")


def decide_gates():
    hashes = HashCache(DEFAULT_DB)
    verdicts = assess(DATASETS, hashes)
    hashes.save()
    write_gates(verdicts)
    for verdict in verdicts:
        if not verdict.fresh:
            STALE.add((verdict.dataset, verdict.stage))
            print(f"stale: {verdict.line()}", file=sys.stderr)


if CONTENT_KEYED and workflow.is_main_process:
    decide_gates()


def keyed(path):
    """A data input whose freshness the stage's gate decides, not its modification time."""
    if not CONTENT_KEYED:
        return path
    if callable(path):
        return lambda wildcards: ancient(path(wildcards))
    return ancient(path)


def gate(stage):
    """Input helper: the stage's gate, plus the done markers of upstream stages that rerun."""

    def paths(wildcards):
        check_profile()
        rerun = [u for u in STAGES[stage].upstream if (wildcards.ds, u) in STALE]
        return [f".gates/{wildcards.ds}/{stage}"] + [
            done_marker(wildcards.ds, u) for u in rerun
        ]

    return paths if CONTENT_KEYED else []


def done(stage):
    """Output helper: the marker a rerun of this stage touches."""
    return touch(f".done/{{ds}}/{stage}")


# ---- dataset helpers ---------------------------------------------------------------------


wildcard_constraints:
    ds="|".join(DATASETS),


def setting(section, key=None):
    """Params helper: a dataset's effective config section (or one key of it)."""

    def value(wildcards):
        chosen = DATASETS[wildcards.ds][section]
        return chosen if key is None else chosen[key]

    return value


def gpus(wildcards):
    """Snakemake's gpu resource: `--resources gpu=1` then runs one GPU job at a time."""
    return 1 if uses_gpu(config["device"]) else 0


def captions_with_model(wildcards):
    return DATASETS[wildcards.ds]["caption"]["backend"] != "template"


def model_mem_mb(training):
    """Resources helper: memory for a model job, from the base model's size."""

    def mem_mb(wildcards):
        settings = DATASETS[wildcards.ds]
        batch = settings["train"]["train_batch_size"] if training else 1
        resolution = settings["resize"]["resolution"]
        return job_mem_mb(config["base_model"], resolution, batch, training)

    return mem_mb


def dataset_dir(wildcards, subdir):
    return os.path.join(DATASETS[wildcards.ds]["path"], subdir)


def dataset_images(wildcards):
    return dataset_dir(wildcards, "images")
