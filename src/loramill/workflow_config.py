"""The config as the workflow reads it at parse time (rules/common.smk): validated, numbers
coerced, each dataset's effective settings, and every problem a user can fix before any job
runs raised as one :class:`LoramillError` line, which the workflow prints as ``loramill: …``.

Like ``content_params``, a core module that names functions of the rooms: each room owns its
options and their checks, and this is where the workflow asks all of them. The tests call
this same code in-process. It must stay free of torch and the model libraries: every
Snakemake invocation, and every job, parses the workflow.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

import jsonschema
from referencing import Registry, Resource
from snakemake.common.configfile import _load_configfile
from snakemake.exceptions import WorkflowError

from loramill import LoramillError
from loramill.captions.autocaption import captioner_class
from loramill.config import (
    REG_FOLDER,
    VALIDATION_FOLDER,
    check_replaced_keys,
    coerce_numbers,
    dataset_config,
    describe,
    grid_settings,
    image_set_entry,
    schema,
    schema_file,
    validated,
    validation_folder,
)
from loramill.grid.plan import check_grid
from loramill.models.base_model import resolve_base_model
from loramill.models.families import image_family
from loramill.prepare.buckets import FAMILY_RESOLUTION, BucketSpec, check_family_step
from loramill.text.language_model import resolve_language_model
from loramill.train.config import REG_OPTIONS, TrainConfig
from loramill.train.family_options import check_family_options


def validate_config(data: dict[str, Any]) -> None:
    """Against the one schema file (loramill.config.schema), as Snakemake's
    ``validate(data, path)`` does: defaults filled in place, an error raised as its
    WorkflowError, which :func:`loramill.config.describe` turns into one line."""
    try:
        _validator().validate(data)
    except jsonschema.ValidationError as error:
        raise WorkflowError("Error validating config file.", error)  # noqa: B904 (as Snakemake)


@cache
def _validator() -> jsonschema.protocols.Validator:
    """snakemake.utils.validate's validator, built once: it reads and parses the schema
    YAML on every call (~0.5 s), and a parse calls it once plus once per dataset."""
    path = schema_file()
    # Its $id as Snakemake sets it: relative $refs resolve against the local file.
    contents = {**schema(), "$id": path.resolve().as_uri()}

    def retrieve(uri: str) -> Resource:
        return Resource.from_contents(_load_configfile(url2pathname(urlparse(uri).path), "Schema"))

    registry = Registry(retrieve=retrieve).with_resource(
        uri=str(path), resource=Resource.from_contents(contents)
    )
    base = jsonschema.Draft202012Validator
    check_properties = base.VALIDATORS["properties"]

    def set_defaults(
        validator: Any, properties: dict, instance: Any, subschema: dict
    ) -> Iterator[jsonschema.ValidationError]:
        for name, option in properties.items():
            if "default" in option:
                # A copy: this schema is every call's (Snakemake's was read for the call),
                # and a config that edits a default in place must not edit the schema.
                instance.setdefault(name, copy.deepcopy(option["default"]))
        yield from check_properties(validator, properties, instance, subschema)

    extended = jsonschema.validators.extend(base, {"properties": set_defaults})
    return extended(contents, registry=registry)


VALIDATION_OPTIONS = ("validation_seed", "validate_every_n_steps")  # need validation


def check_validation(settings: dict[str, Any]) -> None:
    """Options that need validation images, and a validation folder as the stages read it."""
    train, folder = settings["train"], validation_folder(settings)
    if folder is not None and train["validation_split"]:
        raise LoramillError(
            f"train.validation_split {train['validation_split']} has no effect beside "
            f"{folder}/, which is what validation measures; drop validation_split (kohya's "
            "name) or the folder"
        )
    if validated(settings):
        return
    needs = "set train.validation_split, or add validation images in " + str(
        Path(settings["path"]) / VALIDATION_FOLDER / "images"
    )
    for key in VALIDATION_OPTIONS:
        if train[key] is not None:
            raise LoramillError(f"train.{key} has no effect without validation images: {needs}")
    if settings["export"]["checkpoint"] == "best":
        raise LoramillError(f"export.checkpoint: best needs a validation loss: {needs}")
    if str(settings["grid"].get("checkpoints")).startswith("best:"):
        raise LoramillError(f"grid.checkpoints: best:N needs a validation loss: {needs}")


def regularization(settings: dict[str, Any], datasets: Any) -> tuple[str, str] | None:
    """The dataset's regularization images: ``("dataset", name)`` of another dataset of the
    config (train.reg_data names it), ``("folder", path)`` of a folder laid out as a dataset
    (train.reg_data's, else data/<ds>/reg/), or None."""
    reg_data = settings["train"].get("reg_data")
    if reg_data in datasets:
        return "dataset", reg_data
    if reg_data:
        return "folder", reg_data
    folder = Path(settings["path"]) / REG_FOLDER
    return ("folder", folder.as_posix()) if folder.is_dir() else None


def check_regularization(ds: str, settings: dict[str, Any], datasets: dict[str, Any]) -> None:
    """train.reg_data and the options that need regularization images, before any job."""
    train, found = settings["train"], regularization(settings, datasets)
    folder = Path(settings["path"]) / REG_FOLDER
    if train.get("reg_data") and folder.is_dir():
        raise LoramillError(
            f"train.reg_data '{train['reg_data']}' beside {folder}/: choose one (drop "
            "reg_data, kohya's reg_data_dir, or the folder)"
        )
    if found is None:
        for key, unset in REG_OPTIONS.items():
            if train[key] != unset:
                raise LoramillError(
                    f"train.{key} has no effect without regularization images: add "
                    f"{folder}/images/, or set train.reg_data"
                )
        return
    kind, where = found
    other = datasets.get(where, {})
    if kind == "dataset" and (where == ds or other.get("task") != "image"):
        raise LoramillError(f"train.reg_data '{where}': name another image dataset, or a folder")
    if kind == "dataset" and other["train"].get("reg_data") == ds:
        raise LoramillError(
            f"train.reg_data '{where}': {where} regularizes with {ds}; one must not be the "
            "other's regularization images"
        )
    if kind == "folder" and not (Path(where) / "images").is_dir():
        raise LoramillError(
            f"train.reg_data '{where}': neither a dataset of the config nor a folder with "
            "images/ (a folder is laid out as a dataset: images/, optional captions/ and "
            "metadata.csv)"
        )


def with_image_sets(datasets: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``datasets`` and, for each image dataset with a validation folder or a folder of
    regularization images, the folder's entry ``<ds>.validation`` or ``<ds>.reg``
    (loramill.config.image_set_entry): its images are resized, captioned and merged as the
    dataset's are, with their own manifest, captions and caches."""
    sets = {}
    for settings in datasets.values():
        if settings["task"] != "image":
            continue
        kinds = [VALIDATION_FOLDER] if validation_folder(settings) is not None else []
        if (regularization(settings, datasets) or ("",))[0] == "folder":
            kinds.append(REG_FOLDER)
        for kind in kinds:
            entry = image_set_entry(settings, kind)
            sets[entry["name"]] = entry
    return datasets | sets


def check_image_dataset(settings: dict[str, Any]) -> None:
    """Problems a user can fix before any job runs: unknown captioner, train options that
    contradict each other, a missing init_from file."""
    BucketSpec.from_settings(settings["resize"])
    check_family_step(settings["resize"]["bucket_reso_steps"], settings.get("family"))
    captioner_class(settings["caption"])
    check_validation(settings)
    train = TrainConfig.from_dict(settings["train"])
    check_family_options(train, settings.get("family"))
    train.check_machines()
    if settings["device"] == "cpu":
        train.check_device("cpu")
    if train.init_from and not Path(train.init_from).is_file():
        raise LoramillError(f"train.init_from: {train.init_from} is not a file")
    if settings["export"].get("use_ema") and not train.ema:
        raise LoramillError(
            "export.use_ema: true has no effect with train.ema: false; use ema: true, or "
            "drop use_ema"
        )
    check_grid(
        grid_settings(
            settings["grid"],
            settings["trigger"],
            settings["resize"]["resolution"],
            settings.get("family"),
        ),
        settings.get("family"),
    )


def check_dataset(ds: str, settings: dict[str, Any]) -> None:
    """The config problems of one dataset, and data not pulled, before any job runs."""
    # A text dataset's options are the schema's to check (text.train is closed and its
    # mixed_precision an enum), so parsing needs no loramill.text.train, which imports torch:
    # tests/test_config_errors.py holds the schema to what TextTrainConfig refuses.
    text = settings["task"] == "text"
    if not text:
        try:
            check_image_dataset(settings)
        except LoramillError as error:
            raise LoramillError(f"config: datasets.{ds}.{error}") from None
    data = Path(settings["path"]) / ("train.jsonl" if text else "images")
    if not data.exists():
        raise LoramillError(f"dataset {ds}: {data} not found (new clone? run `dvc pull`)")
    folder = None if text else validation_folder(settings)
    if folder is not None and not (folder / "images").is_dir():
        raise LoramillError(
            f"dataset {ds}: put the validation images in {folder}/images/ (the validation "
            "folder is laid out as a dataset: images/, optional captions/ and metadata.csv)"
        )


def load_datasets(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each dataset's effective settings, the whole config checked first. Coerces ``config``'s
    numbers in place: "20" and 20 are then the same config for everything that reads it,
    fingerprints included. Paths are relative to the working directory (the workflow's)."""
    try:
        coerce_numbers(config, schema())
        check_replaced_keys(config)
        validate_config(config)
    except LoramillError:
        raise
    except Exception as error:  # the schema's verdict, as one line naming the key
        raise LoramillError(describe(error)) from None
    datasets = {ds: dataset_config(config, ds, validate_config) for ds in config["datasets"]}
    for settings in datasets.values():
        model, text = settings["base_model"], settings["task"] == "text"
        if not text:  # first: a refiner, an inpainting or a Flux folder is named as such
            family = settings["family"] = image_family(model, settings["base_model_family"])
            # a hub model not downloaded yet: SD's, as before families (its job checks it)
            settings["resize"].setdefault("resolution", FAMILY_RESOLUTION[family or "sd1"])
        (resolve_language_model if text else resolve_base_model)(model)
    for ds, settings in datasets.items():
        check_dataset(ds, settings)
        if settings["task"] == "image":
            try:
                check_regularization(ds, settings, datasets)
            except LoramillError as error:
                raise LoramillError(f"config: datasets.{ds}.{error}") from None
    return with_image_sets(datasets)
