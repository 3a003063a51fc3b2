"""Which files of a model a stage reads, known without loading it: the base model (a diffusers
folder), a text dataset's language model (a transformers folder) and a captioner's model.

Reruns follow the model in use, so a model is fingerprinted by content: a local folder by the
files its loader opens, chosen here the way diffusers and transformers choose them (a folder
often holds more: ``.git/``, a single-file checkpoint at the root, ``fp16`` variants, sample
images; hashing those would retrain on changes that cannot affect a result); a hub id by the
commit the local cache resolves it to, which names the content exactly, costs no hashing of
gigabytes, and stays the same before and after the job that downloads it (the ``fetch_*``
functions run first). Nothing here imports torch, diffusers or transformers.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.hashing import HashCache, hash_value, manifest_hash

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


def hub_snapshot(repo_id: str) -> Path | None:
    """The folder of the commit the local Hugging Face cache resolves ``repo_id`` to, or None."""
    commit = hub_commit(repo_id)
    return _hub_repo_folder(repo_id) / "snapshots" / commit if commit else None


def base_model_fingerprint(spec: str, hashes: HashCache, allow_unsafe_weights: bool = False) -> str:
    """The manifest hash of what a local folder loads, or ``hub:<id>@<commit>``."""
    source = resolve_base_model(spec)
    folder = Path(source)
    if not folder.exists():
        return f"hub:{source}@{hub_commit(source) or 'not-downloaded'}"
    return files_fingerprint(spec, folder, loaded_files(folder, allow_unsafe_weights), hashes)


def component_fingerprint(spec: str, component: str, hashes: HashCache) -> str:
    """One component (``vae``, ``text_encoder``, ``tokenizer``) of a base model, by the files
    the loader reads of it: the key of what is computed from that component alone (cached
    latents, text embeddings), so a new UNet keeps them. A hub id: its commit, as above."""
    source = resolve_base_model(spec)
    folder = Path(source)
    if not folder.exists():
        return base_model_fingerprint(spec, hashes)
    # Pickle files allowed: the loader reads a component's safetensors whenever it has one,
    # and a load that succeeded without one read the pickle file, whatever the option says.
    prefix = f"{component}/"
    loaded = loaded_files(folder, allow_unsafe_weights=True)
    relatives = [f.removeprefix(prefix) for f in loaded if f.startswith(prefix)]
    return files_fingerprint(spec, folder / component, relatives, hashes)


def files_fingerprint(spec: str, folder: Path, relatives: list[str], hashes: HashCache) -> str:
    """The manifest hash of the named files of a model folder: for a folder that holds only
    what its loader reads, the same value as the folder's own hash (loramill.hashing), which
    caches of latents, text embeddings and grid cells were keyed by before, so they stay."""
    files: dict[str, str] = {}
    for relative in relatives:
        try:
            files[relative] = hashes.file(folder / relative)
        except FileNotFoundError:  # a shard named by its index but absent
            raise LoramillError(f"base_model '{spec}': missing file '{relative}'") from None
    hashes.save()  # so the next parse trusts these hashes after one stat per file
    return manifest_hash(files)


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
        raise load_error(spec, error) from error


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def resolve_base_model(spec: str) -> str:
    """Return a local folder path, or the hub id when ``spec`` names no local folder.

    A local path wins over a hub id of the same spelling. Errors name the ``base_model`` key.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        raise LoramillError(
            f"base_model '{spec}': a single-file checkpoint; convert it once with "
            f"`python -m loramill.models.single_file {spec} models/{path.stem}` and use that folder"
        )
    return resolve_model(spec, check_pipeline_folder)


def resolve_model(spec: str, check: Callable[[str, Path], None]) -> str:
    """:func:`resolve_base_model` for any kind of model folder, ``check`` judging a local one."""
    path = Path(spec).expanduser()
    if path.exists():
        check(spec, path)
        return str(path)
    # "models/sd15" with a local models/ folder is a mistyped path, not a hub id.
    looks_local = spec.startswith((".", "/", "~")) or (
        path.parent.is_dir() and path.parent != Path()
    )
    if HUB_ID.match(spec) and not looks_local:
        return spec
    raise LoramillError(f"base_model '{spec}': no such folder, and not a hub id (owner/name)")


def check_pipeline_folder(spec: str, path: Path) -> None:
    """Cheap structural check of a diffusers folder, so a broken one fails before any job."""
    index = path / "model_index.json"
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoramillError(
            f"base_model '{spec}': not a diffusers pipeline folder (no model_index.json)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoramillError(f"base_model '{spec}': unreadable model_index.json ({error})") from None
    # the denoiser: a UNet, or Flux's transformer
    denoiser = "transformer" if (path / "transformer").is_dir() else "unet"
    for name in (denoiser, "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / name).is_dir():
            raise LoramillError(f"base_model '{spec}': missing component folder '{name}/'")
    if not isinstance(components, dict):
        raise LoramillError(f"base_model '{spec}': model_index.json is not a JSON object")


def load_error(spec: str, error: Exception) -> LoramillError:
    is_hub_id = not Path(spec).expanduser().exists()
    offline = is_hub_id and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
    hint = " (HF_HUB_OFFLINE is set)" if offline else ""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return LoramillError(f"base_model '{spec}': cannot load{hint}: {reason}")


LANGUAGE_MODEL_CONFIG = "config.json"


# Read beside the weights: generation defaults, sentencepiece vocabularies (LLaMA-2), chat
# templates kept in their own file (recent transformers).
EXTRA_FILES = ("generation_config.json", "tokenizer.model", "chat_template.jinja")


def check_language_model_folder(spec: str, path: Path) -> None:
    config = (
        _read_json(path / LANGUAGE_MODEL_CONFIG)
        if (path / LANGUAGE_MODEL_CONFIG).is_file()
        else None
    )
    if config is None:
        raise LoramillError(
            f"base_model '{spec}': not a transformers model folder (no {LANGUAGE_MODEL_CONFIG})"
        )
    if not any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or []):
        raise LoramillError(
            f"base_model '{spec}': {LANGUAGE_MODEL_CONFIG} names no *ForCausalLM architecture"
        )


def resolve_language_model(spec: str) -> str:
    """A local folder path, or the hub id; errors name the ``base_model`` key."""
    return resolve_model(spec, check_language_model_folder)


def language_model_files(folder: Path, allow_unsafe_weights: bool = False) -> list[str]:
    """Relative paths of what ``load_causal_lm`` and ``load_tokenizer`` read."""
    names = [
        f for f in (LANGUAGE_MODEL_CONFIG, *EXTRA_FILES, *TOKENIZER_FILES) if (folder / f).is_file()
    ]
    return sorted(set(names + _weight_files(folder, "transformers", allow_unsafe_weights)))


def language_model_fingerprint(
    spec: str, hashes: HashCache, allow_unsafe_weights: bool = False
) -> str:
    """The manifest hash of what a local folder loads, or ``hub:<id>@<commit>``."""
    source = resolve_language_model(spec)
    folder = Path(source)
    if not folder.exists():
        return f"hub:{source}@{hub_commit(source, LANGUAGE_MODEL_CONFIG) or 'not-downloaded'}"
    return files_fingerprint(
        spec, folder, language_model_files(folder, allow_unsafe_weights), hashes
    )


def fetch_language_model(spec: str, allow_unsafe_weights: bool = False) -> None:
    """Download a hub model that is not cached yet: config, tokenizer, the weights."""
    source = resolve_language_model(spec)
    if Path(source).exists() or hub_commit(source, LANGUAGE_MODEL_CONFIG):
        return
    from huggingface_hub import snapshot_download

    weights = [f"{stem}{shard}.safetensors" for stem in SAFE_STEMS for shard in ("", SHARD)]
    if allow_unsafe_weights:
        weights += ["pytorch_model.bin", f"pytorch_model{SHARD}.bin"]
    try:
        snapshot_download(source, allow_patterns=["*.json", "*.txt", *EXTRA_FILES, *weights])
    except Exception as error:  # offline, unknown repo, no access, network: all "cannot load"
        raise load_error(spec, error) from error


def caption_model_fingerprint(spec: str, hashes: HashCache) -> str:
    """A caption model by content: every file of a local folder (``.git`` and other hidden
    entries aside), or a hub id's cached commit; "" for none."""
    if not spec:
        return ""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        files = {
            path.relative_to(folder).as_posix(): hashes.file(path)
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
        }
        return f"files:{hash_value(files)}"
    return f"hub:{spec}@{hub_commit(spec, marker='') or 'not-downloaded'}"


# What a captioner loads from a hub repository: configs, tokenizers, safetensors, ONNX taggers.
CAPTION_MODEL_FILES = ["*.json", "*.txt", "*.jinja", "*.model", "*.safetensors", "*.onnx", "*.csv"]


def fetch_caption_model(spec: str, allow_unsafe_weights: bool = False) -> None:
    """Download a hub model that is not cached yet before the job's fingerprint is taken, so
    the job records the commit later parses see (as loramill.model_files does)."""
    if not spec or Path(spec).expanduser().exists() or hub_commit(spec, marker=""):
        return
    from huggingface_hub import snapshot_download

    patterns = [*CAPTION_MODEL_FILES, "*.bin"] if allow_unsafe_weights else CAPTION_MODEL_FILES
    try:
        snapshot_download(spec, allow_patterns=patterns)
    except Exception as error:  # offline, unknown repo, no access, network
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LoramillError(
            f"caption model '{spec}': cannot download ({reason}); name a local model folder, "
            "or fill the hub cache where there is network"
        ) from error
