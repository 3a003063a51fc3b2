"""The params fingerprinted by content: a stage param that names files its job reads stands, in
the stage's fingerprint, for those files' content, not for their name.

This table is the one place that knows such params. The rerun machinery (loramill.reruns)
asks it and branches on no param name of its own; a new kind of model folder is a new row.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from loramill.hashing import HashCache
from loramill.model_files import (
    base_model_fingerprint,
    caption_model_fingerprint,
    fetch_base_model,
    fetch_caption_model,
    fetch_language_model,
    language_model_fingerprint,
)
from loramill.models.families import image_family


@dataclass(frozen=True)
class ContentParam:
    """``fingerprint(value, hashes, allow_unsafe_weights)``: the content ``value`` names.
    ``fetch(value, allow_unsafe_weights)``: download a hub model before the job fingerprints
    it, so the job records the commit later parses see; None where nothing is downloaded."""

    fingerprint: Callable[[str, HashCache, bool], str]
    fetch: Callable[[str, bool], None] | None = None


def _fetch_image_model(value: str, allow_unsafe_weights: bool) -> None:
    fetch_base_model(value, allow_unsafe_weights)
    image_family(value)  # a hub model's family shows once its configs are on disk


def _file(value: str, hashes: HashCache, allow_unsafe_weights: bool) -> str:
    return hashes.file(value) if value else ""


def _caption_model(value: str, hashes: HashCache, allow_unsafe_weights: bool) -> str:
    return caption_model_fingerprint(value, hashes)  # a folder replaced in place recaptions


BY_CONTENT: dict[str, ContentParam] = {
    "base_model": ContentParam(base_model_fingerprint, _fetch_image_model),
    "language_model": ContentParam(language_model_fingerprint, fetch_language_model),
    "caption_model": ContentParam(_caption_model, fetch_caption_model),
    "init_from": ContentParam(_file),  # an adapter file training starts from
}
