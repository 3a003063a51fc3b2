"""Caption stage: one caption per resized image, written as JSON lines.

Backends share one small interface (loramill.captions.backends) and register by name. Each image's
caption is cached (loramill.captions.cache), so adding one image captions one. Output is sorted
and deterministic: the workflow keys later stages on the content of the captions file.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

import loramill.captions.sentences
import loramill.captions.taggers  # noqa: F401
from loramill import LoramillError
from loramill.captions.backends import (  # noqa: F401  (the stage's interface, re-exported)
    CAPTIONERS,
    CaptionContext,
    Captioner,
    TemplateCaptioner,
    captioner_class,
    make_captioner,
    positive_int,
    string_option,
)
from loramill.captions.cache import CACHE_DIR, CaptionCache, captioner_key
from loramill.dataset_files import MANIFEST
from loramill.files import inside, write_jsonl
from loramill.hashing import HashCache

log = logging.getLogger(__name__)


def _read_manifest(resized_dir: Path) -> dict[str, dict[str, Any]]:
    """The resized images' manifest entries by file name, sorted."""
    manifest_path = resized_dir / MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entries = {entry["file"]: entry for entry in manifest["images"]}
        files = [entry["file"] for entry in manifest["images"]]
    except FileNotFoundError:
        raise LoramillError(f"{manifest_path}: missing (run the resize stage first)") from None
    except json.JSONDecodeError as error:
        raise LoramillError(f"{manifest_path}: not valid JSON ({error.msg})") from None
    except (KeyError, TypeError):
        raise LoramillError(
            f"{manifest_path}: expected {{'images': [{{'file': ...}}, ...]}}"
        ) from None
    if not all(isinstance(name, str) and name for name in files):
        raise LoramillError(f"{manifest_path}: every image needs a file name")
    duplicates = sorted(name for name, count in Counter(files).items() if count > 1)
    if duplicates:
        raise LoramillError(f"{manifest_path}: image listed twice: {duplicates[0]}")
    if not files:
        quarantined = len(manifest.get("quarantined", []))
        raise LoramillError(f"{manifest_path}: no images to caption ({quarantined} quarantined)")
    return {name: entries[name] for name in sorted(files)}


def _open_rgb(resized_dir: Path, name: str) -> Image.Image:
    path = inside(resized_dir, name)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise LoramillError(f"{path}: listed in manifest.json but missing") from None
    except (UnidentifiedImageError, OSError) as error:
        raise LoramillError(f"{path}: cannot read image ({error})") from None


def _digest(resized_dir: Path, name: str, hashes: HashCache) -> str:
    path = inside(resized_dir, name)
    try:
        return hashes.file(path)
    except FileNotFoundError:
        raise LoramillError(f"{path}: listed in manifest.json but missing") from None


def _caption_all(
    captioner: Captioner, resized: Path, files: list[str]
) -> Iterator[tuple[str, str | None]]:
    """(file, caption) for each of ``files``, loading one batch of images at a time so
    memory stays flat on large datasets; None for an image the model failed on."""
    size = captioner.batch_size
    for start in range(0, len(files), size):
        batch = [(file, _open_rgb(resized, file)) for file in files[start : start + size]]
        yield from _caption_batch(captioner, batch)
        log.info("captioned %d/%d images with %s", start + len(batch), len(files), captioner.name)


def _caption_batch(
    captioner: Captioner, batch: list[tuple[str, Image.Image]]
) -> Iterator[tuple[str, str | None]]:
    try:
        texts = captioner.caption(batch)
    except LoramillError:
        raise
    except Exception as error:
        if len(batch) > 1:  # find the image at fault; the others still get their captions
            for one in batch:
                yield from _caption_batch(captioner, [one])
            return
        log.warning(
            "%s: %s failed (%s: %s); empty auto caption",
            batch[0][0],
            captioner.name,
            type(error).__name__,
            error,
        )
        yield batch[0][0], None
        return
    # strict: a backend returning too few captions is a bug, never a silent truncation.
    for (file, _), text in zip(batch, texts, strict=True):
        # One line per caption keeps the later caption .txt files and tag counts clean.
        yield file, " ".join(text.split())


def caption_dataset(
    resized_dir: str | os.PathLike,
    out_jsonl: str | os.PathLike,
    config: Mapping[str, Any],
    dataset: str,
    trigger: str,
    cache_dir: str | os.PathLike = CACHE_DIR,
    hashes: HashCache | None = None,
    name: str = "",
) -> None:
    """Caption every image in ``resized_dir/manifest.json``; write sorted JSONL atomically.

    Records are ``{"image", "image_sha256", "caption", "source"}``: the resized image, the
    sha256 of its source image in the dataset (what caption edits record), the caption, and
    the backend with its model where it has one (``folder``: a repeats folder's concept, see
    :func:`concept_caption`). Images with a cached caption are not captioned again; ``name``
    is the dataset's, for the log line only.
    """
    resized, hashes = Path(resized_dir), hashes or HashCache()
    images = _read_manifest(resized)
    files = list(images)
    backend = captioner_class(config)
    context = {"dataset": dataset, "trigger": trigger}
    cache = CaptionCache(cache_dir, captioner_key(backend, dict(config), context, hashes))
    digests = {file: _digest(resized, file, hashes) for file in files}
    captions = {file: cache.get(digests[file]) for file in files}
    todo = [file for file in files if captions[file] is None]
    if todo:
        captioner = make_captioner(config, dataset=dataset, trigger=trigger)
        for file, text in _caption_all(captioner, resized, todo):
            captions[file] = text or ""
            if text is not None:  # a failure is retried on the next run, not cached
                cache.put(digests[file], text)
    models = [config.get(key) for key in backend.options if key.endswith("model")]
    source = ":".join([backend.name, *filter(None, models)])
    records = []
    for f in files:
        caption, origin = concept_caption(images[f], captions[f], backend.sees_images, source)
        record = {"image": f, "image_sha256": images[f].get("sha256") or digests[f]}
        records.append(record | {"caption": finish(caption, config), "source": origin})
    write_jsonl(out_jsonl, records)
    hashes.save()
    log.info(
        "caption %s: %d captioned, %d reused",
        name or resized.parent.name,
        len(todo),
        len(files) - len(todo),
    )
    warn_if_uninformative(backend.name, [r["caption"] for r in records])


def concept_caption(
    image: Mapping[str, Any], caption: str, sees_images: bool, source: str
) -> tuple[str, str]:
    """The auto caption of an image and where it came from. An image of a kohya repeats folder
    (``images/5_sks dog/``) is captioned with the folder's concept unless a backend that looks
    at the image gave a caption: kohya uses a folder's class tokens as the caption of each
    image that has no caption file, and a captioning model writes what would be that file."""
    concept = image.get("concept", "")
    if concept and not (sees_images and caption):
        return concept, "folder"
    return caption, source


def finish(caption: str, config: Mapping[str, Any]) -> str:
    """The backend's caption cut to ``max_length`` characters (at a word), then ``prefix``
    and ``suffix`` added; an empty caption stays empty. Applied after the per-image cache,
    so changing these never re-runs a model."""
    prefix, suffix = string_option(config, "prefix", ""), string_option(config, "suffix", "")
    limit = positive_int(config, "max_length", 10**9) if config.get("max_length") else None
    if not caption:
        return ""
    if limit and len(caption) > limit:
        cut = caption[: limit + 1]
        caption = (cut.rsplit(" ", 1)[0] if " " in cut else cut[:limit]).rstrip(" ,;")
    return " ".join(f"{prefix}{caption}{suffix}".split())


def warn_if_uninformative(backend: str, captions: list[str]) -> None:
    """Most captions the same (or empty): the captioner does not tell the images apart."""
    if backend == "none" or len(captions) < 4:
        return
    text, count = Counter(captions).most_common(1)[0]
    if count * 2 > len(captions):
        what = "empty" if not text else f"identical ({text!r})"
        log.warning(
            "%d of %d auto captions are %s: check caption.backend, or write caption edits",
            count,
            len(captions),
            what,
        )
