"""Configuration: per-dataset sections and one-line validation errors.

The schema (config/config.schema.yaml) is applied by Snakemake's ``validate`` in
rules/common.smk; this module merges a dataset's overrides over the global sections and turns
jsonschema's multi-line reports into one line that names the offending key.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from loramill import LoramillError

SECTIONS = ("resize", "caption", "merge", "train", "export", "grid", "text")
TASKS = ("image", "text")


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
    if error.validator == "additionalProperties":
        # jsonschema names the unknown key only inside its message.
        message = message.replace("Additional properties are not allowed", "unknown option")
    if error.validator == "propertyNames":
        message = f"dataset name {message} (letters, digits, _ and - only)"
    return f"config: {key_path([*prefix.split('.'), *location] if prefix else location)}: {message}"


def dataset_config(
    config: dict[str, Any],
    dataset: str,
    validate: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """A dataset's effective config: global sections with its overrides merged in.

    ``validate`` checks the merged result against the schema, so a bad override is reported
    under the dataset's own key.
    """
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
    trigger = entry.get("trigger", "")
    merged["trigger_words"] = [trigger] if isinstance(trigger, str) else list(trigger)
    merged["trigger"] = ", ".join(w for w in merged["trigger_words"] if w)
    merged["name"] = dataset
    return merged


def check_replaced_keys(config: dict[str, Any]) -> None:
    """Options that were renamed or replaced: say what took their place, not just "unknown"."""
    from loramill.train_config import check_replaced

    check_replaced(config.get("train") or {}, "config: train")
    datasets = config.get("datasets")
    for ds, entry in datasets.items() if isinstance(datasets, dict) else ():
        if isinstance(entry, dict):
            check_replaced(entry.get("train"), f"config: datasets.{ds}.train")


def grid_prompts(prompts: list[str], trigger: str) -> list[str]:
    return [p.replace("{trigger}", trigger).strip(" ,") for p in prompts]


def grid_settings(grid: dict[str, Any], trigger: str, resolution: int) -> dict[str, Any]:
    """A dataset's grid settings as the grid job takes them: ``{trigger}`` filled in, and
    the training resolution where none is set."""
    settings = {**grid, "prompts": grid_prompts(grid["prompts"], trigger)}
    if grid.get("prompt_sr"):
        settings["prompt_sr"] = [v.replace("{trigger}", trigger) for v in grid["prompt_sr"]]
    if settings.get("resolution") is None:
        settings["resolution"] = resolution
    return settings
