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

from loramill.files import write_json
from loramill.hashing import HashCache, hash_value
from loramill.model_files import caption_model_fingerprint

if TYPE_CHECKING:
    from loramill.captions.backends import Captioner

CACHE_DIR = Path(".cache/captions")


def captioner_key(
    backend: type[Captioner], config: dict[str, Any], context: dict[str, str], hashes: HashCache
) -> dict[str, Any]:
    """What decides a captioner's output, besides the image: its output options, with each
    model (an option named ``*model``) by content."""
    chosen = backend.output_options(config)
    for key, value in chosen.items():
        if key.endswith("model") and value:
            chosen[key] = caption_model_fingerprint(str(value), hashes)
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
