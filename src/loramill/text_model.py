"""The base model of a text dataset (issue #15): a local transformers folder or a hub id.

As for the image base model (loramill.base_model_files), a folder is fingerprinted by the files
the loader reads — config, tokenizer, the weights transformers picks — and a hub id by the
commit the local cache resolves it to, downloaded first so the fingerprint the job records is
the one later parses compute. Weights load from safetensors unless the user opts in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.base_model_files import (
    SAFE_STEMS,
    SHARD,
    TOKENIZER_FILES,
    _read_json,
    _weight_files,
    files_fingerprint,
    hub_commit,
)
from loramill.hashing import HashCache
from loramill.model import _load_error, resolve_model, safetensors_float32_bytes, torch_dtype

MARKER = "config.json"
# Read beside the weights: generation defaults, sentencepiece vocabularies (LLaMA-2), chat
# templates kept in their own file (recent transformers).
EXTRA_FILES = ("generation_config.json", "tokenizer.model", "chat_template.jinja")


def check_language_model_folder(spec: str, path: Path) -> None:
    config = _read_json(path / MARKER) if (path / MARKER).is_file() else None
    if config is None:
        raise LoramillError(f"base_model '{spec}': not a transformers model folder (no {MARKER})")
    if not any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or []):
        raise LoramillError(f"base_model '{spec}': {MARKER} names no *ForCausalLM architecture")


def resolve_language_model(spec: str) -> str:
    """A local folder path, or the hub id; errors name the ``base_model`` key."""
    return resolve_model(spec, check_language_model_folder)


def loaded_files(folder: Path, allow_unsafe_weights: bool = False) -> list[str]:
    """Relative paths of what ``load_causal_lm`` and ``load_tokenizer`` read."""
    names = [f for f in (MARKER, *EXTRA_FILES, *TOKENIZER_FILES) if (folder / f).is_file()]
    return sorted(set(names + _weight_files(folder, "transformers", allow_unsafe_weights)))


def language_model_fingerprint(
    spec: str, hashes: HashCache, allow_unsafe_weights: bool = False
) -> str:
    """``files:<manifest hash>`` of what a local folder loads, or ``hub:<id>@<commit>``."""
    source = resolve_language_model(spec)
    folder = Path(source)
    if not folder.exists():
        return f"hub:{source}@{hub_commit(source, MARKER) or 'not-downloaded'}"
    return files_fingerprint(spec, folder, loaded_files(folder, allow_unsafe_weights), hashes)


def fetch_language_model(spec: str, allow_unsafe_weights: bool = False) -> None:
    """Download a hub model that is not cached yet: config, tokenizer, the weights."""
    source = resolve_language_model(spec)
    if Path(source).exists() or hub_commit(source, MARKER):
        return
    from huggingface_hub import snapshot_download

    weights = [f"{stem}{shard}.safetensors" for stem in SAFE_STEMS for shard in ("", SHARD)]
    if allow_unsafe_weights:
        weights += ["pytorch_model.bin", f"pytorch_model{SHARD}.bin"]
    try:
        snapshot_download(source, allow_patterns=["*.json", "*.txt", *EXTRA_FILES, *weights])
    except Exception as error:  # offline, unknown repo, no access, network: all "cannot load"
        raise _load_error(spec, error) from error


def _local(source: str) -> dict[str, Any]:
    return {"local_files_only": Path(source).exists()}


def load_tokenizer(spec: str) -> Any:
    """The model's tokenizer, with a pad token (its EOS) where it has none: batches pad."""
    from transformers import AutoTokenizer

    source = resolve_language_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_local(source))
    except (OSError, ValueError) as error:
        raise _load_error(spec, error) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(spec: str, dtype: str = "float32", allow_unsafe_weights: bool = False) -> Any:
    """The frozen base model, in eval mode."""
    from transformers import AutoModelForCausalLM

    source = resolve_language_model(spec)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype(dtype),
            use_safetensors=None if allow_unsafe_weights else True,  # None: pickle allowed
            **_local(source),
        )
    except (OSError, ValueError) as error:
        raise _load_error(spec, error) from error
    return model.eval().requires_grad_(False)


def model_config(spec: str) -> dict[str, Any]:
    """The model's config.json, as a dict."""
    from transformers import AutoConfig

    source = resolve_language_model(spec)
    try:
        return AutoConfig.from_pretrained(source, **_local(source)).to_dict()
    except (OSError, ValueError) as error:
        raise _load_error(spec, error) from error


def text_job_mem_mb(spec: str, training: bool) -> int:
    """A memory request for a text job: the float32 weights, twice over when training
    (activations, gradients through the frozen layers), plus the interpreter and libraries."""
    try:
        folder = Path(resolve_language_model(spec))
    except LoramillError:
        return 0
    weights = [folder / f for f in loaded_files(folder) if f.endswith(".safetensors")]
    weights_mb = sum(map(safetensors_float32_bytes, weights)) / 2**20 if folder.exists() else 0
    return int(weights_mb * (2.0 if training else 1.25) + 1000)
