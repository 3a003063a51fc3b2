"""Publish trained adapters with DVC: one .dvc file per artifact, pushed to your own remote.

Checkpoints are published too: a teammate who clones and pulls can then change a grid axis
or an export option and rerun just that stage, never training.

    python -m loramill.publish [--remote NAME] [--dry-run] [DATASET ...]

Only artifacts whose content changed are re-added, so an unchanged dataset's .dvc files are
never rewritten and two people publishing different datasets touch different files.

DVC is driven through its documented command line (dvc.repo.Repo is internal and changes
between releases), run as `python -m dvc` with this interpreter: the DVC this project pins.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from loramill import LoramillError
from loramill.config import NO_DIFFUSERS_FILE, dataset_config
from loramill.config import validated as is_validated

DIFFUSERS_FILE = "exports/{ds}.diffusers.safetensors"
VALIDATION_FILES = ("results/{ds}/validation.json", "results/{ds}/validation.png")
# What a dataset publishes: outputs of its stage rules (rules/*.smk, their one source), as the
# rules spell them; tests/test_outputs_documented.py refuses any that no rule writes.
ARTIFACTS = {
    "image": (
        "results/{ds}/checkpoints",  # a folder: one .dvc file for the dataset's checkpoints
        "results/{ds}/loss.png",  # the loss curve (the report shows it)
        "results/{ds}/captions.jsonl",  # a grid that sets no prompts draws them from these
        "exports/{ds}.safetensors",
        DIFFUSERS_FILE,  # not for every network type (config.NO_DIFFUSERS_FILE)
        "exports/{ds}.md",  # the model card
        "exports/{ds}.html",  # the model card as the report opens it
        "exports/{ds}-steps",  # a folder: one kohya file per checkpoint
        "grids/{ds}.png",
        "grids/{ds}.json",
        "grids/{ds}-pages",  # a folder: the grid's pages after the first (empty for one page)
        VALIDATION_FILES[0],  # with a validation loss only (rule validate)
        VALIDATION_FILES[1],
    ),
    "text": (
        "results/{ds}/adapters",  # a folder: every checkpoint's peft adapter
        "exports/{ds}",  # a folder: adapter, provenance, card, GGUF, merged model
        "evaluations/{ds}.md",
        "evaluations/{ds}.json",
        "evaluations/{ds}.html",
    ),
}
DEMO_REMOTE = "demo"
DEMO_REMOTE_DIR = "dvc-demo-remote"
ADD_REMOTE_HINT = "dvc remote add -d <name> <url>"


@dataclass
class PublishReport:
    """What a publish did (or, with dry_run, would do); paths are relative to the root."""

    remote: str
    new: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    dvc_files: list[str] = field(default_factory=list)
    gitignores: list[str] = field(default_factory=list)
    has_locks: bool = False
    dry_run: bool = False

    @property
    def changed(self) -> list[str]:
        return self.new + self.modified

    @property
    def git_add(self) -> list[str]:
        # Every .dvc file of the run, not only rewritten ones: `git add` of an unchanged file is
        # a no-op, and a .dvc file left unstaged by an earlier publish gets staged too.
        paths = [*self.dvc_files, "data.dvc", *self.gitignores]
        return ["git", "add", *paths, *(["locks/"] if self.has_locks else [])]

    @property
    def git_add_line(self) -> str:
        return shlex.join(self.git_add)


def _dvc(root: Path, *args: str, capture: bool = False) -> str:
    command = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    result = subprocess.run(
        command, cwd=root, env=env, text=True, capture_output=capture, check=False
    )
    if result.returncode != 0:
        detail = (result.stderr or "").strip().splitlines()
        raise LoramillError(f"dvc {args[0]} failed: {detail[-1] if detail else 'see above'}")
    return result.stdout or ""


def md5_file(path: Path) -> str:
    """The md5 DVC 3 records for a single file (plain md5 of its bytes)."""
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_md5(dvc_file: Path) -> str | None:
    """The md5 a single-file .dvc records, or None when it is absent or not in that form."""
    try:
        (out,) = yaml.safe_load(dvc_file.read_text())["outs"]
        # Legacy (DVC 2) entries hash text files differently: count them as changed.
        return out["md5"] if out.get("hash") == "md5" else None
    except (OSError, yaml.YAMLError, TypeError, KeyError, ValueError, AttributeError):
        return None


def target_remote(root: Path, remote: str | None) -> str:
    """Resolve the remote to push to, refusing the bundled demo remote."""
    urls: dict[str, str] = {}
    default = None
    # `dvc config --list` prints each level (system … local) in rising precedence, with local
    # paths already resolved; `dvc remote list` would wrap long URLs.
    for line in _dvc(root, "config", "--list", capture=True).splitlines():
        key, _, value = line.partition("=")
        if key == "core.remote":
            default = value
        elif key.startswith("remote.") and key.endswith(".url"):
            urls[key[len("remote.") : -len(".url")]] = value
    name = remote or default
    if name is None:
        raise LoramillError(f"no default DVC remote to push to: add yours with {ADD_REMOTE_HINT}")
    if name not in urls:
        known = ", ".join(sorted(urls)) or "none"
        raise LoramillError(f"no DVC remote named '{name}' (configured: {known})")
    url = urls[name].removeprefix("file://")
    demo_dir = (root / DEMO_REMOTE_DIR).resolve()
    if name == DEMO_REMOTE or ("://" not in url and Path(root, url).resolve() == demo_dir):
        raise LoramillError(
            f"remote '{name}' is the bundled demo remote, which is for the demo data only; "
            f"add your own and make it the default: {ADD_REMOTE_HINT} (or pass --remote NAME)"
        )
    return name


def _artifacts(
    datasets: list[str],
    tasks: dict[str, str],
    without_diffusers: Collection[str],
    validated: Collection[str] = (),
) -> list[str]:
    """The paths the datasets publish, by their tasks (image when not given); ``validated``:
    the image datasets with a validation loss."""
    return [
        pattern.format(ds=ds)
        for ds in dict.fromkeys(datasets)
        for pattern in ARTIFACTS[tasks.get(ds, "image")]
        if not (ds in without_diffusers and pattern == DIFFUSERS_FILE)
        and (ds in validated or pattern not in VALIDATION_FILES)
    ]


def publish(
    root: Path, datasets: list[str], remote: str | None = None, dry_run: bool = False,
    tasks: dict[str, str] | None = None, without_diffusers: Collection[str] = (),
    validated: Collection[str] = (),
) -> PublishReport:  # fmt: skip
    """`dvc add` the changed artifacts of ``datasets`` (``tasks``: each one's task, image
    when not given; ``without_diffusers``: image datasets whose network type has no
    diffusers-format file; ``validated``: those with a validation loss) and push them with
    data.dvc."""
    root = Path(root).resolve()
    artifacts = _artifacts(datasets, tasks or {}, without_diffusers, validated)
    # All or nothing: a half-published dataset would leave a teammate's pull inconsistent.
    missing = [path for path in artifacts if not (root / path).exists()]
    if missing:
        raise LoramillError(
            f"missing {', '.join(missing)}: run `snakemake --cores 1 train_all` first, "
            "or name only the datasets to publish"
        )
    if not (root / "data.dvc").is_file():
        raise LoramillError("data.dvc not found: track the images with `dvc add data` first")
    report = PublishReport(target_remote(root, remote), dry_run=dry_run)
    report.dvc_files = [f"{path}.dvc" for path in artifacts]
    report.has_locks = (root / "locks").is_dir()
    folders = []
    for path in artifacts:
        recorded = recorded_md5(root / f"{path}.dvc")
        if not (root / f"{path}.dvc").exists():
            report.new.append(path)
        elif (root / path).is_dir():
            folders.append(path)  # DVC's folder hash is its own: ask `dvc status` below
        elif recorded != md5_file(root / path):
            report.modified.append(path)
        else:
            report.unchanged.append(path)

    # An unchanged file whose object is not in the cache (new clone, cleared cache) would make
    # `dvc push` skip it with only a warning and exit 0: re-add those. data/ must match data.dvc,
    # or the pushed images would not be the ones the adapters were trained on.
    checked = [f"{path}.dvc" for path in report.unchanged + folders] + ["data.dvc"]
    stale = json.loads(_dvc(root, "status", "--json", *checked, capture=True) or "{}")
    for path in folders:
        (report.modified if _modified(stale, f"{path}.dvc") else report.unchanged).append(path)
    if "data.dvc" in stale:
        raise LoramillError(
            "data/ differs from data.dvc or is not in the DVC cache: "
            "run `dvc add data` (or `dvc pull data.dvc`), then publish again"
        )
    to_add = report.changed + [path for path in report.unchanged if f"{path}.dvc" in stale]
    if dry_run:
        return report

    ignore_files = sorted({".gitignore"} | {str(Path(p).parent / ".gitignore") for p in to_add})
    before = {name: _read_or_none(root / name) for name in ignore_files}
    if to_add:
        _dvc(root, "add", "--quiet", *to_add)
    report.gitignores = [n for n in ignore_files if _read_or_none(root / n) != before[n]]
    _dvc(root, "push", "--remote", report.remote, *report.dvc_files, "data.dvc")
    return report


def _modified(status: dict, dvc_file: str) -> bool:
    """Whether `dvc status --json` says the output changed (not merely "not in cache")."""
    entries = status.get(dvc_file) or []
    states = [v for e in entries if isinstance(e, dict) for v in e.get("changed outs", {}).values()]
    return "modified" in states


def _read_or_none(path: Path) -> bytes | None:
    return path.read_bytes() if path.exists() else None


def summary(report: PublishReport) -> str:
    """Human summary: what changed, where it went, and the git command to record it."""
    lines = [f"{'new' if p in report.new else 'modified':<9} {p}" for p in report.changed]
    if not report.changed:
        lines.append(f"Nothing changed: all {len(report.unchanged)} artifacts already published.")
    elif report.unchanged:
        lines.append(f"unchanged {len(report.unchanged)} other artifacts")
    what = f"{len(report.dvc_files)} artifacts and data/"
    if report.dry_run:
        lines.append(f"Would push {what} to remote '{report.remote}'.")
    else:
        lines.append(f"Remote '{report.remote}' now holds {what}.")
    lines += ["Then record them in git:", f"  {report.git_add_line}"]
    return "\n".join(lines)


def _has_diffusers_file(config: dict[str, Any], ds: str) -> bool:
    """Whether an image dataset's export writes a diffusers-format file (its effective
    network type's, the global train section merged with its own)."""
    settings = dataset_config(config, ds)
    network_type = settings.get("train", {}).get("network_type", "lora")
    return settings.get("task", "image") != "image" or network_type not in NO_DIFFUSERS_FILE


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loramill.publish",
        description=__doc__.split("\n\n")[0],
    )
    parser.add_argument("--remote", help="DVC remote to push to (default: the default remote)")
    parser.add_argument("--dry-run", action="store_true", help="report only; add/push nothing")
    parser.add_argument("datasets", nargs="*", help="datasets to publish (default: all)")
    args = parser.parse_args(argv)
    root = Path.cwd()
    try:
        config_path = root / "config" / "config.yaml"
        if not config_path.is_file():
            raise LoramillError(f"{config_path} not found: run from the project root")
        config = yaml.safe_load(config_path.read_text()) or {}
        entries = config.get("datasets") or {}
        configured = list(entries)
        tasks = {ds: (entry or {}).get("task", "image") for ds, entry in entries.items()}
        without = [ds for ds in entries if not _has_diffusers_file(config, ds)]
        unknown = [ds for ds in args.datasets if ds not in configured]
        if unknown:
            raise LoramillError(
                f"unknown dataset {', '.join(unknown)} (config/config.yaml has: "
                f"{', '.join(configured)})"
            )
        validated = [ds for ds in entries if is_validated(dataset_config(config, ds))]
        report = publish(
            root, args.datasets or configured, args.remote, args.dry_run, tasks, without,
            validated,
        )  # fmt: skip
    except LoramillError as error:
        print(f"loramill: publish: {error}", file=sys.stderr)
        return 1
    print(summary(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
