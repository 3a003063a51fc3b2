"""Per-image caption cache: adding one image to a dataset captions one.

An entry is keyed by the resized image's content, the captioner (backend and the options that
change its output), the caption model's content (a local folder's files, or the hub commit the
local cache resolves to) and what the captioner knows of the dataset (name, trigger word).
Entries are small JSON files under ``.cache/captions/``, written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramill import LoramillError
from loramill.base_model_files import hub_commit
from loramill.files import write_json
from loramill.hashing import HashCache, hash_value

if TYPE_CHECKING:
    from loramill.captioners import Captioner

CACHE_DIR = Path(".cache/captions")


def model_fingerprint(spec: str, hashes: HashCache) -> str:
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
DOWNLOADED = ["*.json", "*.txt", "*.jinja", "*.model", "*.safetensors", "*.onnx", "*.csv"]


def fetch_caption_model(spec: str, allow_unsafe_weights: bool = False) -> None:
    """Download a hub model that is not cached yet before the job's fingerprint is taken, so
    the job records the commit later parses see (as loramill.base_model_files does)."""
    if not spec or Path(spec).expanduser().exists() or hub_commit(spec, marker=""):
        return
    from huggingface_hub import snapshot_download

    patterns = [*DOWNLOADED, "*.bin"] if allow_unsafe_weights else DOWNLOADED
    try:
        snapshot_download(spec, allow_patterns=patterns)
    except Exception as error:  # offline, unknown repo, no access, network
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LoramillError(
            f"caption model '{spec}': cannot download ({reason}); name a local model folder, "
            "or fill the hub cache where there is network"
        ) from error


def captioner_key(
    backend: type[Captioner], config: dict[str, Any], context: dict[str, str], hashes: HashCache
) -> dict[str, Any]:
    """What decides a captioner's output, besides the image: its output options, with each
    model (an option named ``*model``) by content."""
    chosen = backend.output_options(config)
    for key, value in chosen.items():
        if key.endswith("model") and value:
            chosen[key] = model_fingerprint(str(value), hashes)
    return {"backend": backend.name, "options": chosen, "context": context}


class CaptionCache:
    def __init__(self, root: str | os.PathLike, captioner: dict[str, Any]) -> None:
        self.root, self.captioner = Path(root), captioner

    def _path(self, image_sha256: str) -> Path:
        key = hash_value({"image": image_sha256, "captioner": self.captioner})
        return self.root / key[:2] / f"{key}.json"

    def get(self, image_sha256: str) -> str | None:
        try:
            return json.loads(self._path(image_sha256).read_text(encoding="utf-8"))["caption"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, image_sha256: str, caption: str) -> None:
        write_json(self._path(image_sha256), {"caption": caption})
