# Configuration, the dataset table and input helpers shared by every rule.

import os
import sys
from pathlib import Path

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
from loramill.config import dataset_config, describe, grid_prompts
from loramill.model import resolve_base_model

SCHEMA = str(Path(workflow.basedir) / "config" / "config.schema.yaml")
ENV = "../envs/loramill.yaml"


def validate_config(data):
    validate(data, SCHEMA)


def check_dataset(ds, settings):
    """Problems a user can fix before any job runs: unknown captioner, data not pulled."""
    try:
        captioner_class(settings["caption"])
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
        validate_config(config)
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


wildcard_constraints:
    ds="|".join(DATASETS),


def setting(section, key=None):
    """Params helper: a dataset's effective config section (or one key of it)."""

    def value(wildcards):
        chosen = DATASETS[wildcards.ds][section]
        return chosen if key is None else chosen[key]

    return value


def dataset_dir(wildcards, subdir):
    return os.path.join(DATASETS[wildcards.ds]["path"], subdir)


def dataset_files(subdir, pattern="*"):
    """Input helper: the files of data/<ds>/<subdir>, so adding, removing or editing one
    reruns the stage (a folder input would only notice additions and removals)."""

    def files(wildcards):
        folder = Path(dataset_dir(wildcards, subdir))
        return sorted(
            str(p)
            for p in folder.glob(pattern)
            if p.is_file() and not p.name.startswith(".")
        )

    return files


def base_model_files():
    """The local base model's files as inputs; a hub id has none to watch."""
    folder = Path(config["base_model"])
    return (
        sorted(str(p) for p in folder.rglob("*") if p.is_file())
        if folder.is_dir()
        else []
    )
