"""The workflow's stages as data: what each one reads, writes and depends on.

Snakemake rules say *how* a stage runs; this registry says what decides whether its result
is still valid, for the content-keyed rerun mechanism (loramill.freshness): the config keys it
reads, the code that runs it, the libraries whose versions matter, the base model, its raw
dataset inputs and the upstream outputs it consumes.
"""

from __future__ import annotations

import importlib.metadata
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent
ML_STACK = ("torch", "diffusers", "transformers", "peft", "safetensors", "pillow", "numpy")


@dataclass(frozen=True)
class Stage:
    name: str  # the Snakemake rule and the lock file name
    module: str  # loramill module holding the stage's logic
    outputs: tuple[str, ...]  # content outputs, templates with {ds}
    config_keys: tuple[str, ...] = ()  # dotted keys of the dataset's effective config
    packages: tuple[str, ...] = ()
    base_model: bool = False
    raw_inputs: tuple[str, ...] = ()  # folders of the dataset: "images", "captions"
    config_files: tuple[str, ...] = ()  # dotted config keys naming files read by content
    consumes: tuple[tuple[str, str], ...] = ()  # (upstream stage, output template)
    logs: tuple[str, ...] = field(default=())  # restored from the run-cache, never hashed

    def paths(self, templates: tuple[str, ...], ds: str) -> list[str]:
        return [t.format(ds=ds) for t in templates]

    @property
    def upstream(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(name for name, _ in self.consumes))


STAGES: dict[str, Stage] = {
    stage.name: stage
    for stage in (
        Stage(
            "resize",
            "resize",
            outputs=("results/{ds}/resized",),
            config_keys=("resize",),
            packages=("pillow",),
            raw_inputs=("images",),
        ),
        Stage(
            "caption",
            "caption",
            outputs=("results/{ds}/auto_captions.jsonl",),
            config_keys=("caption", "trigger", "allow_unsafe_weights", "device"),
            packages=ML_STACK,
            consumes=(("resize", "results/{ds}/resized"),),
        ),
        Stage(
            "merge_captions",
            "merge",
            outputs=("results/{ds}/captions.jsonl", "results/{ds}/caption_report.json"),
            config_keys=("trigger",),
            raw_inputs=("captions",),
            consumes=(("caption", "results/{ds}/auto_captions.jsonl"),),
        ),
        Stage(
            "train",
            "train",
            outputs=("results/{ds}/checkpoints",),
            config_keys=("train", "trigger", "allow_unsafe_weights", "device"),
            config_files=("train.init_from",),
            packages=(*ML_STACK, "accelerate"),
            base_model=True,
            consumes=(
                ("resize", "results/{ds}/resized"),
                ("merge_captions", "results/{ds}/captions.jsonl"),
            ),
            logs=("results/{ds}/tensorboard", "results/{ds}/loss.png"),
        ),
        Stage(
            "export",
            "export",
            outputs=("exports/{ds}.safetensors", "exports/{ds}.diffusers.safetensors"),
            config_keys=("name",),
            packages=("torch", "safetensors"),
            consumes=(("train", "results/{ds}/checkpoints"),),
        ),
        Stage(
            "grid",
            "grid",
            outputs=("grids/{ds}.png", "grids/{ds}.json"),
            config_keys=("grid", "trigger", "resize.resolution", "allow_unsafe_weights", "device"),
            packages=ML_STACK,
            base_model=True,
            consumes=(("train", "results/{ds}/checkpoints"),),
        ),
    )
}


def pick(settings: dict[str, Any], dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = value[part]
    return value


def stage_config(stage: Stage, settings: dict[str, Any]) -> dict[str, Any]:
    """The parsed config values a stage reads; compared semantically, never as YAML text."""
    return {key: pick(settings, key) for key in stage.config_keys}


# A regex, not ast: this runs at every parse, and the package's own imports are plain.
IMPORTS = re.compile(
    r"^\s*(?:from\s+loramill\.(\w+)\s+import|import\s+loramill\.(\w+)"
    r"|from\s+loramill\s+import\s+(\([^)]*\)|[^\n]+))",
    re.MULTILINE,
)


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for module, imported, listed in IMPORTS.findall(path.read_text(encoding="utf-8")):
        names.update(filter(None, (module, imported)))
        names.update(n.split(" as ")[0].strip() for n in listed.strip("()").split(","))
    return {n for n in names if n and (PACKAGE_DIR / f"{n}.py").is_file()}


@cache
def code_files(module: str) -> tuple[Path, ...]:
    """The stage module and every loramill module it imports, transitively.

    The package ``__init__`` is left out: it holds the version string, and a release bump
    alone must not retrain anything (library versions are tracked separately).
    """
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(_imported_modules(PACKAGE_DIR / f"{name}.py") - seen)
    return tuple(PACKAGE_DIR / f"{name}.py" for name in sorted(seen))


@cache
def versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Installed versions of the libraries a stage's result depends on.

    loramill's own version is not among them: a release bump alone must not retrain anything
    (changed code is caught by the code hash).
    """
    found = {}
    for package in packages:
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = "absent"
    return found
