# Configuration, the dataset table and input helpers shared by every rule.

import functools
import logging
import os
import re
import sys
from pathlib import Path

from snakemake.io import apply_wildcards
from snakemake.settings.enums import RerunTrigger
from snakemake.settings.types import DeploymentMethod
import snakemake

from loramill import LoramillError

from loramill.reruns import failures
from loramill.reruns.snakemake_compat import check_snakemake_version

try:
    check_snakemake_version(snakemake.__version__)
except LoramillError as error:
    sys.exit(f"loramill: {error}")

from loramill.captions.autocaption import captioner_class
from loramill.devices import uses_gpu
from loramill.reruns.fingerprints import CONDA_ENV_VAR
from loramill.reruns.gates import done_marker, ensure_markers, stale_gate
from loramill.hashing import DEFAULT_DB, HashCache, hash_file
from loramill.models.base_model import job_mem_mb
from loramill.models.families import half_in_training
from loramill.reruns.rule_jobs import rule_stage, stage_of
from loramill.train.stopping import pass_signals_to_jobs
from loramill.reruns.staleness import Planner
from loramill.text.language_model import text_job_mem_mb
from loramill.train.config import (
    PROMPT_OPTIONS,
    RUN_OPTIONS,
    VALIDATION_ONLY_OPTIONS,
)
from loramill.train.family_options import FLUX_FAMILIES
from loramill.config import IMAGE_SET_TASK, NO_DIFFUSERS_FILE, grid_settings, validated
from loramill.workflow_config import load_datasets

ENV = "../envs/loramill.yaml"

# Every config check (loramill.workflow_config) at parse time, before any job runs. Nothing
# imported here may import torch or the model libraries (tests/test_config_errors.py): every
# Snakemake invocation and every job parses this file.
try:
    DATASETS = load_datasets(config)
except LoramillError as error:
    sys.exit(f"loramill: {error}")
IMAGE_DATASETS = [
    ds for ds, settings in DATASETS.items() if settings["task"] == "image"
]
# Image datasets whose network type diffusers cannot load (LoHa, LoKr, DoRA): their export is
# the rule export_lycoris, which writes no diffusers-format file
NO_DIFFUSERS = [
    ds
    for ds in IMAGE_DATASETS
    if DATASETS[ds]["train"]["network_type"] in NO_DIFFUSERS_FILE
]
TEXT_DATASETS = [ds for ds, settings in DATASETS.items() if settings["task"] == "text"]
# Image datasets with a validation loss (the validate rule), from validation_split or a folder of
# their own, whose entry <ds>.validation in DATASETS runs resize, caption and merge only
VALIDATED = [ds for ds in IMAGE_DATASETS if validated(DATASETS[ds])]


# ---- content-keyed reruns (src/loramill/reruns/staleness.py, gates.py) ---------------------------
# Rules read data inputs through keyed() (ancient: modification times never trigger a rerun),
# list gate(stage) among their inputs and done() among their outputs. A stage's description is
# its rule: the planner evaluates the rule's params and inputs for each dataset and
# fingerprints them exactly as the job will (loramill.reruns.fingerprints). It runs from the first
# gate() input function, once per dataset, so Snakemake's DAG settings (-R …) are known and
# --lint or a target of one dataset hashes nothing else. Only the main process decides:
# cluster jobs re-parse this file.

CONTENT_KEYED = config["content_keyed_reruns"]
PROFILE_HINT = (
    "content-keyed reruns need the workflow profile (profiles/default: rerun-triggers: mtime, "
    "max-checksum-file-size: 0), or Snakemake reruns by modification time; drop "
    "--workflow-profile none / --rerun-triggers / --max-checksum-file-size"
)
# per task, in definition order, from gate()
STAGE_RULES = {"image": [], "text": [], IMAGE_SET_TASK: []}
# What the planner warns about (a lock it cannot use, a dataset that took over another's
# results) reaches the terminal as one line each.
logging.getLogger("loramill").addHandler(logging.StreamHandler(sys.stderr))
if workflow.deployment_settings and DeploymentMethod.CONDA in (
    workflow.deployment_settings.deployment_method
):
    os.environ[CONDA_ENV_VAR] = hash_file(
        Path(workflow.basedir) / "envs" / "loramill.yaml"
    )


def check_profile():
    # Snakemake only attaches the DAG settings after parsing, so this runs from the first
    # gate() input function instead of at parse time.
    settings = workflow.dag_settings
    if (
        set(settings.rerun_triggers) != {RerunTrigger.MTIME}
        or settings.max_checksum_file_size
    ):
        sys.exit(f"loramill: {PROFILE_HINT}")


@functools.cache
def hash_cache():
    return HashCache(DEFAULT_DB)


@functools.cache
def planner(task):
    check_profile()
    stages = [rule_stage(stage_rules(stage), DATASETS) for stage in STAGE_RULES[task]]
    forced = set().union(*map(forced_outputs, workflow.dag_settings.forcerun))
    return Planner(stages, hash_cache(), forced)


def forced_outputs(name):
    """What --forcerun's ``name`` forces, as the planner reads it: a stage's rule by its first
    output for each dataset it runs for (a stage may have a rule per kind of dataset, export
    and export_lycoris), an output file or a rule of no stage as named."""
    if not workflow.is_rule(name):
        return {name}
    forced = workflow.get_rule(name)
    if forced.output.get("done") is None:
        return {name}
    stage = stage_of(forced)
    return {
        apply_wildcards(str(forced.output[0]), {"ds": ds})
        for ds in DATASETS
        if forced.is_producer(done_marker(ds, stage))
    }


def stage_rules(stage):
    """The rules that run ``stage``: those whose done marker is the stage's."""
    return [
        each
        for each in workflow.rules
        if each.output.get("done") is not None and stage_of(each) == stage
    ]


@functools.cache
def gate_file():
    return stale_gate()  # dated once per pass


def linked_sets(ds):
    """The entries whose outputs the dataset's stages read: its validation folder's and its
    regularization images' (an image set, or another dataset)."""
    if DATASETS[ds]["task"] != "image":
        return []
    sets = [f"{ds}.validation", reg_set(ds)]
    return [other for other in sets if other in DATASETS]


@functools.cache
def verdicts(ds):
    task = DATASETS[ds]["task"]
    linked = {
        other: (planner(DATASETS[other]["task"]), verdicts(other))
        for other in linked_sets(ds)
    }
    found = planner(task).plan(ds, linked)
    hash_cache().save()
    ensure_markers(ds, STAGE_RULES[task])
    for verdict in found.values():
        if not verdict.fresh:
            print(f"stale: {verdict.line()}", file=sys.stderr)
    return found


def keyed(path):
    """A data input whose freshness the stage's gate decides, not its modification time."""
    if not CONTENT_KEYED:
        return path
    if callable(path):
        return lambda wildcards: ancient(path(wildcards))
    return ancient(path)


def gate(stage, *tasks):
    """Input helper: the stale gate when the stage must run, plus the done markers of the
    stages it reads from that will run. ``tasks``: the kinds of dataset the stage is for
    (default: image).
    """
    for task in tasks or ("image",):
        if (
            stage not in STAGE_RULES[task]
        ):  # a stage may have a rule per kind of dataset
            STAGE_RULES[task].append(stage)

    def paths(wildcards):
        if not workflow.is_main_process:
            return []  # a cluster job re-parsing the workflow: the main process decided
        verdict = verdicts(wildcards.ds)[stage]
        if verdict.fresh:
            return []
        # Every producer's marker, not only the stale ones': a fresh producer may run too
        # (an output to rebuild, a run Snakemake found incomplete), and then Snakemake would
        # not look at this stage's gate until the next invocation (Snakemake issue #4166).
        own = [done_marker(wildcards.ds, u) for u in verdict.upstream]
        return [gate_file(), *own, *(done_marker(o, s) for o, s in verdict.linked)]

    return paths if CONTENT_KEYED else []


def done(stage):
    """Output helper: the marker a run of this stage touches."""
    return touch(done_marker("{ds}", stage))


# ---- interrupts and failures (src/loramill/train/stopping.py, failures.py) ----------------------
# A signal to Snakemake reaches its running jobs too (Snakemake's local executor would wait
# for them to end): a training saves its state at the next step and stops. With keep-going
# the other datasets finish; the end of the run lists each failed job's one-line reason.

RUN_STARTED = failures.now()


onstart:
    pass_signals_to_jobs()


onerror:
    print(failures.summary(RUN_STARTED), end="", file=sys.stderr)


# ---- dataset helpers ---------------------------------------------------------------------


wildcard_constraints:
    # validation folders' entries have a dot in their names (<ds>.validation)
    ds="|".join(map(re.escape, DATASETS)),


def one_of(names):
    """A wildcard constraint admitting exactly ``names`` (none: nothing)."""
    return "|".join(re.escape(name) for name in names) or "(?!)"


def setting(section, key=None):
    """Params helper: a dataset's effective config section, one key of it, or some keys of
    it (a tuple: those keys' values by name)."""

    def value(wildcards):
        chosen = DATASETS[wildcards.ds][section]
        if isinstance(key, tuple):
            return {name: chosen[name] for name in key}
        return chosen if key is None else chosen[key]

    return value


def train_setting(wildcards):
    """Params helper: the train section less where a multi-machine run meets and where its
    frozen weights wait (RUN_OPTIONS), which scripts/train.py and validate.py read from the
    config: a resubmission meeting on other machines, or swapping other blocks, is the same
    training, so its fingerprint and resumable state stay; and less what only validation
    reads (VALIDATION_ONLY_OPTIONS: rule validate has them).
    """
    return train_section_less(wildcards, (*RUN_OPTIONS, *VALIDATION_ONLY_OPTIONS))


def validate_setting(wildcards):
    """Params helper: the train section as validation reads it (the network, the objective,
    validation_seed), less RUN_OPTIONS as train_setting."""
    return train_section_less(wildcards, RUN_OPTIONS)


def train_section_less(wildcards, left_out):
    chosen = DATASETS[wildcards.ds]["train"]
    return {k: v for k, v in chosen.items() if k not in left_out}


def gpus(wildcards):
    """Snakemake's gpu resource: `--resources gpu=1` then runs one GPU job at a time."""
    return 1 if uses_gpu(config["device"]) else 0


def train_processes(wildcards):
    return DATASETS[wildcards.ds]["train"]["num_processes"]


def captions_with_model(wildcards):
    return DATASETS[wildcards.ds]["caption"]["backend"] != "template"


def model_mem_mb(training):
    """Resources helper: memory for a model job, from the base model's size."""

    def mem_mb(wildcards):
        settings = DATASETS[wildcards.ds]
        batch = settings["train"]["train_batch_size"] if training else 1
        resolution = settings["resize"]["resolution"]
        processes = settings["train"]["num_processes"] if training else 1
        precision = settings["train"]["mixed_precision"] if training else "no"
        half = half_in_training(settings["family"], precision)
        network_type = settings["train"]["network_type"]
        return processes * job_mem_mb(
            settings["base_model"], resolution, batch, training, half, network_type
        )

    return mem_mb


def dataset_dir(wildcards, subdir):
    return os.path.join(DATASETS[wildcards.ds]["path"], subdir)


def dataset_images(wildcards):
    return dataset_dir(wildcards, "images")


def dataset_masks(wildcards):
    """The loss masks folder, when the dataset has one."""
    folder = dataset_dir(wildcards, "masks")
    return [folder] if os.path.isdir(folder) else []


def caption_edits(wildcards):
    """The human caption edits folder, when the dataset has one."""
    folder = dataset_dir(wildcards, "captions")
    return [folder] if os.path.isdir(folder) else []


def caption_model(wildcards):
    """The model the dataset's captioner loads, as a param: its content is part of the
    caption stage's fingerprint (loramill.reruns.fingerprints), so a folder replaced in place
    recaptions."""
    settings = DATASETS[wildcards.ds]["caption"]
    keys = [k for k in captioner_class(settings).options if k.endswith("model")]
    return settings[keys[0]] if keys else ""


def metadata_csv(wildcards):
    """The human caption edits table, when the dataset has one."""
    path = os.path.join(DATASETS[wildcards.ds]["path"], "metadata.csv")
    return [path] if os.path.isfile(path) else []


def grid_adapters(wildcards):
    """The grid's adapter file of every step: the export's kohya files (what users load, as
    they load them); for FLUX.1 and Chroma the training checkpoints, diffusers-format files
    of the adapter the export's kohya files hold (it verifies them against these), which
    diffusers loads at any width (its converter of kohya's Flux layout reads FLUX.1's only).
    """
    if DATASETS[wildcards.ds]["family"] in FLUX_FAMILIES:
        return f"results/{wildcards.ds}/checkpoints"
    return f"exports/{wildcards.ds}-steps"


def reg_set(ds):
    """Where the dataset's regularization images are prepared: another dataset train.reg_data
    names, or the entry of its folder (<ds>.reg); None without any."""
    named = DATASETS[ds]["train"]["reg_data"]
    if named in DATASETS:
        return named
    return f"{ds}.reg" if f"{ds}.reg" in DATASETS else None


def reg_input(name):
    """Input helper: one of the regularization images' prepared files, when there are some."""

    def path(wildcards):
        found = reg_set(wildcards.ds)
        return [f"results/{found}/{name}"] if found else []

    return path


def validation_set(wildcards):
    """Where the dataset's validation images are prepared: its validation folder's entry
    (<ds>.validation), else the dataset itself (validation_split holds them out)."""
    folder = f"{wildcards.ds}.validation"
    return folder if folder in DATASETS else wildcards.ds


def validation_input(name):
    """Input helper: one of the validation images' prepared files."""
    return lambda wildcards: f"results/{validation_set(wildcards)}/{name}"


def validation_folder(wildcards):
    """The validation folder the images come from ("": validation_split's)."""
    ds = validation_set(wildcards)
    return DATASETS[ds]["path"] if ds != wildcards.ds else ""


def validation_result(wildcards):
    """The validation result, for the datasets that have one."""
    return (
        [f"results/{wildcards.ds}/validation.json"] if wildcards.ds in VALIDATED else []
    )


def grid_validation(wildcards):
    """The validation result, when the grid compares the best checkpoints by it (best:N)."""
    selection = str(DATASETS[wildcards.ds]["grid"].get("checkpoints"))
    return validation_result(wildcards) if selection.startswith("best:") else []


def grid_captions(wildcards):
    """The training captions, when the grid takes its prompts from them (it sets none): only
    then are they part of the grid's fingerprint, so a caption edit reaches set prompts never.
    """
    if DATASETS[wildcards.ds]["grid"]["prompts"]:
        return []
    return [f"results/{wildcards.ds}/captions.jsonl"]


def name_if_captioned(wildcards):
    """The dataset name for a caption template that writes it: renaming the dataset then
    changes the captions, and otherwise changes nothing."""
    return (
        wildcards.ds
        if "{dataset}" in DATASETS[wildcards.ds]["caption"]["template"]
        else ""
    )


# ---- text datasets -----------------------------------------------------------------------


def text_setting(stage):
    """Params helper: one stage's part of a text dataset's ``text`` section, under its config
    key (``{"train": {...}}``), so a change reads "config text.train.… changed"."""

    def value(wildcards):
        return {stage: DATASETS[wildcards.ds]["text"][stage]}

    return value


def eval_jsonl(wildcards):
    """The dataset's own evaluation records, when it has them."""
    path = dataset_dir(wildcards, "eval.jsonl")
    return [path] if os.path.isfile(path) else []


def text_mem_mb(training):
    def mem_mb(wildcards):
        return text_job_mem_mb(DATASETS[wildcards.ds]["base_model"], training)

    return mem_mb
