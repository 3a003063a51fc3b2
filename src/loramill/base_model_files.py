"""Fingerprinting the base model by what the loader reads, so reruns follow the model in use.

A local diffusers folder often holds more than the pipeline loads: a ``.git/`` folder, a
single-file ``v1-5-pruned.safetensors`` at the root, ``fp16`` or ``non_ema`` variants,
READMEs and sample images. Hashing all of it retrains on changes that cannot affect a result,
so a folder is fingerprinted by the files ``load_pipeline`` opens, chosen here the way
diffusers and transformers choose them. A hub id is fingerprinted by the commit the local
cache resolves it to: that names the content exactly, costs no hashing of gigabytes, and stays
the same before and after the job that downloads it (``fetch_base_model`` runs first).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.hashing import HashCache, manifest_hash
from loramill.model import _load_error, resolve_base_model

CONFIG_FILES = ("config.json", "scheduler_config.json", "preprocessor_config.json")
# Recent transformers read tokenizer.json and skip vocab.json/merges.txt when it exists; older
# ones read those instead. Every tokenizer file present is kept: they are small, and a needless
# rerun is cheaper than a missed one.
TOKENIZER_FILES = (
    "vocab.json",
    "merges.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "added_tokens.json",
)
# Weight files in each library's lookup order, (safetensors, pickle): diffusers tries a shard
# index before the single file, transformers the single file first. Variants (fp16, non_ema)
# are only read when asked for by name, which load_pipeline never does.
WEIGHT_ORDER = {
    "diffusers": (
        ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors"),
        ("diffusion_pytorch_model.bin",),
    ),
    "transformers": (
        ("model.safetensors", "model.safetensors.index.json"),
        ("pytorch_model.bin", "pytorch_model.bin.index.json"),
    ),
}
# load_pipeline passes safety_checker=None, so its (1.2 GB) folder is never read.
NOT_LOADED = frozenset({"safety_checker"})
COMMIT = re.compile(r"[0-9a-f]{40}")
# Shard names as save_pretrained writes them: model-00001-of-00002.safetensors.
SHARD = "-[0-9][0-9][0-9][0-9][0-9]-of-[0-9][0-9][0-9][0-9][0-9]"
SAFE_STEMS = ("diffusion_pytorch_model", "model")


def loaded_files(folder: Path, allow_unsafe_weights: bool = False) -> list[str]:
    """Relative posix paths of the files ``load_pipeline`` reads from a diffusers folder."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    files = ["model_index.json"]
    for name, value in index.items():
        # Components are [library, class] pairs; [null, null] marks one the pipeline lacks.
        is_component = (
            isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value)
        )
        component = folder / name
        if not is_component or name in NOT_LOADED or not component.is_dir():
            continue
        names = [f for f in (*CONFIG_FILES, *TOKENIZER_FILES) if (component / f).is_file()]
        names += _weight_files(component, value[0], allow_unsafe_weights)
        files += [f"{name}/{f}" for f in names]
    return sorted(set(files))


def _weight_files(component: Path, library: str, allow_unsafe_weights: bool) -> list[str]:
    """The weight file (or shard index and shards) each library would pick in ``component``."""
    found: list[str] = []
    for owner, (safe, pickled) in WEIGHT_ORDER.items():
        # A component of another library (safety checker: "stable_diffusion") may use either.
        if library in WEIGHT_ORDER and owner != library:
            continue
        for name in (*safe, *pickled) if allow_unsafe_weights else safe:
            if (component / name).is_file():
                found.append(name)
                if name.endswith(".index.json"):
                    weight_map = _read_json(component / name).get("weight_map", {})
                    found += sorted(set(weight_map.values()))
                break
    return found


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoramillError(f"base model file '{path}': unreadable ({error})") from None
    if not isinstance(value, dict):
        raise LoramillError(f"base model file '{path}': not a JSON object")
    return value


def _hub_repo_folder(repo_id: str) -> Path:
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    # Read at call time, as hf_hub_download and snapshot_download do: the same folder the loader
    # searches (HF_HUB_CACHE, else HF_HOME/hub, as set when huggingface_hub was imported).
    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")


def hub_commit(repo_id: str, marker: str = "model_index.json") -> str | None:
    """The commit the local Hugging Face cache resolves ``repo_id`` to, or None; offline.
    ``marker``: a file the snapshot must hold (a diffusers pipeline's model_index.json)."""
    repo = _hub_repo_folder(repo_id)
    try:
        commit = (repo / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not COMMIT.fullmatch(commit):  # a hand-edited ref must not point outside snapshots/
        return None
    # A ref without its snapshot's model_index.json is a download that never got going.
    return commit if (repo / "snapshots" / commit / marker).exists() else None


def base_model_fingerprint(spec: str, hashes: HashCache, allow_unsafe_weights: bool = False) -> str:
    """``files:<manifest hash>`` of what a local folder loads, or ``hub:<id>@<commit>``."""
    source = resolve_base_model(spec)
    folder = Path(source)
    if not folder.exists():
        return f"hub:{source}@{hub_commit(source) or 'not-downloaded'}"
    return files_fingerprint(spec, folder, loaded_files(folder, allow_unsafe_weights), hashes)


def files_fingerprint(spec: str, folder: Path, relatives: list[str], hashes: HashCache) -> str:
    """``files:<manifest hash>`` of the named files of a model folder."""
    files: dict[str, str] = {}
    for relative in relatives:
        try:
            files[relative] = hashes.file(folder / relative)
        except FileNotFoundError:  # a shard named by its index but absent
            raise LoramillError(f"base_model '{spec}': missing file '{relative}'") from None
    hashes.save()  # so the next parse trusts these hashes after one stat per file
    return "files:" + manifest_hash(files)


def download_patterns(allow_unsafe_weights: bool = False) -> list[str]:
    """``snapshot_download`` patterns for what ``loaded_files`` keeps (fnmatch: ``*`` spans
    ``/``, so ``*/name`` matches in any component folder but not the root's checkpoints)."""
    weights = [f"*/{stem}{shard}.safetensors" for stem in SAFE_STEMS for shard in ("", SHARD)]
    if allow_unsafe_weights:
        weights += [
            "*/diffusion_pytorch_model.bin",
            "*/pytorch_model.bin",
            f"*/pytorch_model{SHARD}.bin",
        ]
    return ["*.json", "*.txt", *weights]


def fetch_base_model(spec: str, allow_unsafe_weights: bool = False) -> None:
    """Download a hub model that is not cached yet, before its fingerprint is taken, so the
    fingerprint recorded by the job is the one later parses compute."""
    source = resolve_base_model(spec)
    if Path(source).exists() or hub_commit(source):
        return
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(
            source,
            allow_patterns=download_patterns(allow_unsafe_weights),
            ignore_patterns=[f"{name}/*" for name in sorted(NOT_LOADED)],
        )
    except Exception as error:  # offline, unknown repo, no access, network: all "cannot load"
        raise _load_error(spec, error) from error
