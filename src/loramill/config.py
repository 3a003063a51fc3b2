"""Configuration: per-dataset sections and one-line validation errors.

The schema (config/config.schema.yaml) is applied by Snakemake's ``validate`` in
rules/common.smk; this module merges a dataset's overrides over the global sections, reads
numbers written as strings ("20", 1e-4) as numbers before that, and turns jsonschema's and
YAML's multi-line reports into one line that names the offending key, or file line and column.

The schema is also where every option's default is stated: the classes that hold a section's
options take their defaults from it (:func:`schema_defaults`), so code and config agree.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import json
import re
from collections.abc import Callable, Iterable
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

from loramill import LoramillError

SECTIONS = ("resize", "caption", "merge", "train", "export", "grid", "text")
TASKS = ("image", "text")
# train.network_type values whose export has no diffusers-format file: diffusers refuses LoHa's
# and LoKr's keys in any file, drops DoRA's magnitudes from a kohya file and reads a
# diffusers-format DoRA per output row, not per input column (loramill.models.dora). The export
# rule of such a dataset is export_lycoris; publish leaves the file out.
NO_DIFFUSERS_FILE = ("loha", "lokr", "dora")
SCHEMA = Path("config") / "config.schema.yaml"  # in the workflow's folder
T = TypeVar("T")


def schema_file() -> Path:
    """The workflow's schema, found above the package wherever this module lives in it."""
    for folder in Path(__file__).resolve().parents:
        if (folder / SCHEMA).is_file():
            return folder / SCHEMA
    raise LoramillError(f"{SCHEMA}: not found in a folder above {Path(__file__).parent}")


@cache
def schema() -> dict[str, Any]:
    """The config schema, read once per process: with libyaml where PyYAML has it (0.05 s
    instead of 1 s; every Snakemake invocation and job reads it while parsing)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(schema_file().read_text(encoding="utf-8"), Loader=loader)


def schema_defaults(section: str) -> dict[str, Any]:
    """The ``default:`` of each option of a section (``train``; ``text.train`` for a nested
    one), in the types the option classes hold: numbers as floats where the schema takes any
    number (YAML reads ``8`` as an int), lists as tuples (frozen classes are hashable)."""
    first, *rest = section.split(".")
    options = schema()["$defs"][first]
    for part in rest:
        options = options["properties"][part]
    defaults = {}
    for name, option in options["properties"].items():
        if "default" not in option:
            continue
        value, kinds = option["default"], option.get("type", ())
        if isinstance(value, int) and not isinstance(value, bool) and "number" in kinds:
            value = float(value)
        defaults[name] = tuple(value) if isinstance(value, list) else value
    return defaults


def with_schema_defaults(section: str) -> Callable[[type[T]], type[T]]:
    """A class decorator, under ``@dataclass``: every annotated field without a value of its
    own gets the schema's default for the option of that name (a fresh copy per instance
    for a mapping). A field the schema has no default for is a KeyError at import."""

    def apply(cls: type[T]) -> type[T]:
        defaults = schema_defaults(section)
        for name in inspect.get_annotations(cls):
            if name in cls.__dict__:
                continue
            value = defaults[name]
            if isinstance(value, dict):
                value = dataclasses.field(default_factory=lambda v=value: copy.deepcopy(v))
            setattr(cls, name, value)
        return cls

    return apply


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def key_path(parts: list[Any]) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def describe(error: Exception, prefix: str = "") -> str:
    """One line for a jsonschema ValidationError: ``config: train.rank: -1 is less than ...``."""
    import jsonschema

    if not isinstance(error, jsonschema.ValidationError):
        # Snakemake's validate wraps the jsonschema error in a WorkflowError.
        causes = [a for a in getattr(error, "args", ()) if isinstance(a, Exception)]
        causes += [c for c in (error.__cause__, error.__context__) if c is not None]
        return describe(causes[0], prefix) if causes else str(error).splitlines()[0]
    location = list(error.absolute_path)
    message = error.message
    if error.validator == "additionalProperties" and isinstance(error.instance, dict):
        # jsonschema names the unknown keys only inside its message; the first is the one to
        # fix (the next run names the next)
        known = error.schema.get("properties", {})
        unknown = [key for key in error.instance if key not in known] or ["?"]
        location.append(unknown[0])
        message = f"unknown option{did_you_mean(str(unknown[0]), known)}"
    if error.validator == "propertyNames":
        message = f"dataset name {message} (letters, digits, _ and - only)"
    return f"config: {key_path([*prefix.split('.'), *location] if prefix else location)}: {message}"


def did_you_mean(key: str, known: Iterable[str]) -> str:
    """`` (did you mean rank?)`` for the known option closest to a misspelt one, else ``""``."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


# What YAML users write for numbers that PyYAML reads as strings: "20" quoted, and 1e-4
# (YAML 1.1 needs a dot for a float: 1.0e-4).
INTEGER = re.compile(r"[+-]?[0-9]+")
NUMBER = re.compile(r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?")


def branches(schema: Any, root: dict[str, Any]) -> list[dict[str, Any]]:
    """A schema and its oneOf/anyOf alternatives, local $refs resolved."""
    if not isinstance(schema, dict):
        return []
    if "$ref" in schema:
        name = schema["$ref"].removeprefix("#/$defs/")
        schema = {**root["$defs"][name], **{k: v for k, v in schema.items() if k != "$ref"}}
    found = [schema]
    for alternative in (*schema.get("oneOf", ()), *schema.get("anyOf", ())):
        found += branches(alternative, root)
    return found


def as_number(text: str, schema: Any, root: dict[str, Any]) -> Any:
    """The number a string spells where the schema takes a number and no string, else the text."""
    types: set[str] = set()
    for branch in branches(schema, root):
        kind = branch.get("type", [])
        types.update([kind] if isinstance(kind, str) else kind)
    if "string" in types or not types & {"integer", "number"}:
        return text
    if INTEGER.fullmatch(text.strip()):
        return int(text)
    if "number" in types and NUMBER.fullmatch(text.strip()):
        return float(text)
    return text


def coerced(value: Any, schema: Any, root: dict[str, Any]) -> Any:
    """``value`` with its numeric strings turned into numbers, in place where it is a container."""
    if isinstance(value, str):
        return as_number(value, schema, root)
    for branch in branches(schema, root):
        if isinstance(value, dict):
            extra = branch.get("additionalProperties")
            for key, item in value.items():
                value[key] = coerced(item, branch.get("properties", {}).get(key, extra), root)
        elif isinstance(value, list) and isinstance(branch.get("items"), dict):
            value[:] = [coerced(item, branch["items"], root) for item in value]
    return value


def coerce_numbers(config: dict[str, Any], schema: dict[str, Any]) -> None:
    """Read ``rank: "20"`` as ``rank: 20`` before validation, in the global sections and each
    dataset's overrides alike, so the number is what every stage and fingerprint sees."""
    coerced(config, schema, schema)
    datasets = config.get("datasets")
    for entry in datasets.values() if isinstance(datasets, dict) else ():
        for section in SECTIONS:
            if isinstance(entry, dict) and isinstance(entry.get(section), dict):
                coerced(entry[section], schema["properties"][section], schema)


def check_yaml_syntax(path: str) -> None:
    """A YAML syntax error as ``path:line:column: problem``.

    Snakemake's own message names only the Snakefile line of ``configfile:``. Like Snakemake,
    JSON is tried first; composing the YAML finds every syntax error without building values.
    """
    import yaml

    with open(path, encoding="utf-8") as stream:
        text = stream.read()
    try:
        json.loads(text)
        return
    except ValueError:
        pass
    try:
        _compose(text)
    except yaml.MarkedYAMLError as error:
        mark, context = error.problem_mark, error.context_mark
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else path
        message = f"{where}: {error.problem}"
        if context is not None and error.context and context.line != getattr(mark, "line", None):
            # e.g. an unclosed quote: the end of the file is the problem, the quote the cause
            message += f" ({error.context} at {context.line + 1}:{context.column + 1})"
        raise LoramillError(message) from None


@cache
def _compose(text: str) -> None:
    """Composes ``text``, once per process for a text that composes: the tests plan in one
    process many times over, and the pure-Python composer (the one whose messages users
    read) takes ~0.1 s for config/config.yaml. A text that fails is composed again each time."""
    import yaml

    yaml.compose(text, Loader=yaml.SafeLoader)


# Image sets: folders laid out as a dataset (images/, optional captions/ and metadata.csv) that
# a dataset's stages read beside its images: data/<ds>/validation/ (the validation loss,
# loramill.train.validation) and data/<ds>/reg/ or train.reg_data's folder (regularization
# images, loramill.train.regularization). Each has an entry <ds>.<kind> (a name no dataset has:
# names have no dots), resized, captioned and merged with the dataset's settings.
VALIDATION_FOLDER = "validation"
REG_FOLDER = "reg"
IMAGE_SET_TASK = "image_set"


def validation_folder(settings: dict[str, Any]) -> Path | None:
    """The dataset's own validation folder, when it has one."""
    folder = Path(settings["path"]) / VALIDATION_FOLDER
    return folder if folder.is_dir() else None


def validated(settings: dict[str, Any]) -> bool:
    """Whether an image dataset has a validation loss: a validation folder or
    train.validation_split (read without the schema's defaults too: publish reads the raw
    config)."""
    split = settings.get("train", {}).get("validation_split")
    image = settings.get("task", "image") == "image"
    return image and bool(validation_folder(settings) or split)


def image_set_path(settings: dict[str, Any], kind: str) -> str:
    """Where a dataset's image set of ``kind`` lies: its folder, or train.reg_data's."""
    reg_data = settings.get("train", {}).get("reg_data")
    return reg_data if kind == REG_FOLDER and reg_data else f"{settings['path']}/{kind}"


def image_set_entry(settings: dict[str, Any], kind: str) -> dict[str, Any]:
    """The entry of a dataset's image set: the dataset's settings, the set's path."""
    name, path = f"{settings['name']}.{kind}", image_set_path(settings, kind)
    return settings | {"path": path, "task": IMAGE_SET_TASK, "name": name}


def dataset_config(
    config: dict[str, Any],
    dataset: str,
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """A dataset's effective config: global sections with its overrides merged in.

    ``validate`` checks the merged result against the schema, so a bad override is reported
    under the dataset's own key. ``<ds>.validation``, ``<ds>.reg``: its image sets' entries.
    """
    parent, dot, kind = dataset.partition(".")
    if dot and kind in (VALIDATION_FOLDER, REG_FOLDER) and parent in config["datasets"]:
        return image_set_entry(dataset_config(config, parent, validate), kind)
    entry = config["datasets"][dataset] or {}
    merged = {k: v for k, v in config.items() if k != "datasets"}
    for section in SECTIONS:
        merged[section] = deep_merge(config.get(section, {}), entry.get(section, {}))
    try:
        if validate is not None:
            validate({**merged, "datasets": {dataset: {}}})
    except Exception as error:
        raise LoramillError(describe(error, prefix=f"datasets.{dataset}")) from None
    merged["path"] = entry.get("path", f"data/{dataset}")
    merged["task"] = entry.get("task", "image")
    default_model = merged["text"].get("base_model") if merged["task"] == "text" else None
    merged["base_model"] = entry.get("base_model") or default_model or config.get("base_model")
    merged["base_model_family"] = entry.get("base_model_family", merged.get("base_model_family"))
    trigger = entry.get("trigger", "")
    merged["trigger_words"] = [trigger] if isinstance(trigger, str) else list(trigger)
    merged["trigger"] = ", ".join(w for w in merged["trigger_words"] if w)
    merged["name"] = dataset
    return merged


def check_replaced_keys(config: dict[str, Any]) -> None:
    """Options that were renamed or replaced: say what took their place, not just "unknown"."""
    check_replaced(config.get("train") or {}, "config: train")
    datasets = config.get("datasets")
    for ds, entry in datasets.items() if isinstance(datasets, dict) else ():
        if isinstance(entry, dict):
            check_replaced(entry.get("train"), f"config: datasets.{ds}.train")


def grid_prompts(prompts: list[str], trigger: str) -> list[str]:
    return [p.replace("{trigger}", trigger).strip(" ,") for p in prompts]


# The grid's guidance_scale where none is set, by family: the pipelines' own defaults
# (FLUX.1 [dev]'s feeds its guidance embedding, Chroma's is classifier-free guidance)
GRID_GUIDANCE = {"flux": 3.5, "chroma": 5.0}
SD_GUIDANCE = 7.5


def grid_settings(
    grid: dict[str, Any], trigger: str, resolution: int, family: str | None = None
) -> dict[str, Any]:
    """A dataset's grid settings as the grid job takes them: ``{trigger}`` filled in, the
    training resolution where none is set, the ``family``'s guidance scale where none is."""
    settings = {**grid, "prompts": grid_prompts(grid["prompts"], trigger)}
    if settings.get("guidance_scale") is None:
        settings["guidance_scale"] = GRID_GUIDANCE.get(family or "", SD_GUIDANCE)
    if grid.get("prompt_sr"):
        settings["prompt_sr"] = [v.replace("{trigger}", trigger) for v in grid["prompt_sr"]]
    if settings.get("resolution") is None:
        settings["resolution"] = resolution
    return settings


REPLACED = {
    "dtype": "replaced by train.mixed_precision (no | fp16 | bf16); LoRA weights and "
    "optimizer state always stay float32",
    # kohya's SDXL option: loramill's only behaviour, whatever the family
    "no_half_vae": "the VAE always encodes in float32 here (SDXL's overflows in fp16), "
    "once per image into the latent cache; remove the option",
    "cache_text_encoder_outputs": "the frozen text encoders' outputs are always cached here "
    "(.cache/text_embeddings/) while captions do not vary per step; remove the option",
}


def check_replaced(section: Any, where: str = "train") -> None:
    if not isinstance(section, dict):
        return  # the schema reports it
    for key, hint in REPLACED.items():
        if key in section:
            raise LoramillError(f"{where}.{key}: {hint}")
