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
from typing import Any

from loramill.base_model_files import hub_commit
from loramill.files import write_json
from loramill.hashing import HashCache, hash_value

CACHE_DIR = Path(".cache/captions")
# Options that change how fast captions come, never what they say.
NOT_OUTPUT = frozenset({"batch_size", "allow_unsafe_weights"})


def model_fingerprint(spec: str, hashes: HashCache) -> str:
    """A caption model by content: every file of a local folder (``.git`` and other hidden
    entries aside), or a hub id's cached commit."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        files = {
            path.relative_to(folder).as_posix(): hashes.file(path)
            for path in sorted(folder.rglob("*"))
            if path.is_file() and not any(p.startswith(".") for p in path.relative_to(folder).parts)
        }
        return f"files:{hash_value(files)}"
    return f"hub:{spec}@{hub_commit(spec) or 'not-downloaded'}"


def captioner_key(
    backend: str,
    options: tuple[str, ...],
    config: dict[str, Any],
    context: dict[str, str],
    hashes: HashCache,
) -> dict[str, Any]:
    """What decides a captioner's output, besides the image."""
    chosen = {k: config.get(k) for k in options if k not in NOT_OUTPUT}
    if chosen.get("model"):
        chosen["model"] = model_fingerprint(str(chosen["model"]), hashes)
    return {"backend": backend, "options": chosen, "context": context}


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
