"""Stage 1: bring every image of a dataset to its training size (loramill.prepare.pixels, .buckets).

A file that cannot be used is quarantined: left untouched in the dataset, listed with its
reason in the manifest, in ``quarantine.csv`` (``file,reason``) and in one warning line. The
reasons: a subfolder (except kohya's repeats folders ``<repeats>_<concept>``, whose images are
read with their folder's repeat count and concept), an unsupported type, a link leading out
of the dataset (links into the project's DVC cache are how DVC checks files out, and are
read), an empty file, a name that differs from another only in case or extension, a
byte-identical duplicate (the later name in sort order), a file that does not decode, one
over the decompression-bomb limit, and one smaller than ``resize.min_side``.

Per image the result is cached under ``.cache/resized``, keyed by the image's content, the
resize settings and the stage's code (or older code that makes the same pixels:
loramill.prepare.same_pixels), so adding one image to 500 processes one. Images are
processed over the job's threads, one worker process each.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import unicodedata
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.dataset_files import (
    IMAGE_SUFFIXES,
    MANIFEST,
    entries,
    link_allowed,
    match_key,
    repeats_folder,
)
from loramill.files import atomic_path, write_bytes, write_json
from loramill.hashing import HashCache, hash_value
from loramill.prepare.buckets import BucketSpec, bucket_for, bucket_sizes
from loramill.prepare.masks import ALPHA, MASKS, fitted_mask, mask_files, mask_of, orphans
from loramill.prepare.pixels import (
    Unusable,
    crop_top_left,
    decode,
    displayed_size,
    fit,
    open_image,
    to_rgb,
)
from loramill.prepare.same_pixels import SAME_PIXELS
from loramill.reruns.run_cache import link_data

log = logging.getLogger(__name__)

CACHE_DIR = Path(".cache/resized")
PNG_LEVEL = 1  # intermediate files: fast to write, read once into the latent cache


@dataclass(frozen=True)
class Settings:
    """The ``resize`` config section, as the stage uses it."""

    buckets: BucketSpec
    background: str = "white"
    min_side: int | None = None  # default: half the resolution

    @classmethod
    def from_config(cls, resize: dict[str, Any]) -> Settings:
        min_side = resize.get("min_side")
        return cls(BucketSpec.from_settings(resize), resize.get("background", "white"), min_side)

    @property
    def smallest(self) -> int:
        return self.min_side if self.min_side is not None else self.buckets.resolution // 2


@dataclass(frozen=True)
class Task:
    source: str
    entry: str  # cache entry path, without suffix
    settings: Settings
    mask: str | None = None  # its mask file (loramill.prepare.masks)


def output_name(path: Path, concept: str = "") -> str:
    """``<stem>.png``, the stem NFC-normalised (a name typed on macOS matches one from Linux);
    ``<concept>__<stem>.png`` for an image of a repeats folder: unique beside the top-level
    images, and unchanged when only the folder's repeat count changes (edits keep matching)."""
    stem = f"{concept}__{path.stem}" if concept else path.stem
    return unicodedata.normalize("NFC", stem) + ".png"


@dataclass(frozen=True)
class Listed:
    """A file of the dataset's image folder, or of one of its kohya repeats folders."""

    path: Path
    source: str  # images/<name> or images/<N>_<concept>/<name>
    repeats: int = 1  # times per epoch, from the folder's name
    concept: str = ""  # the folder's caption, kohya's class tokens

    @property
    def file(self) -> str:
        return output_name(self.path, self.concept)


# Why a folder that is not read is quarantined, and what to write instead.
SUBFOLDER = (
    "subfolders are not read, except kohya repeats folders named <repeats>_<concept> "
    "(images/5_sks dog/: each image 5 times per epoch, concept 'sks dog'); "
    "to repeat the whole dataset set train.repeats"
)


def _candidates(images_dir: Path) -> Iterator[tuple[os.DirEntry, Listed]]:
    """Every entry to consider: the top level, and the entries of each repeats folder."""
    for entry in entries(images_dir, "images"):
        found = repeats_folder(entry.name) if entry.is_dir(follow_symlinks=False) else None
        yield entry, Listed(Path(entry.path), f"images/{entry.name}")
        for inner in entries(entry.path, "images") if found else []:
            source = f"images/{entry.name}/{inner.name}"
            yield inner, Listed(Path(inner.path), source, *found)


def listed(images_dir: Path) -> Iterator[tuple[Listed, str | None]]:
    """Each file to read, with the reason it is quarantined on sight (or None); a repeats
    folder itself is not listed, its files are."""
    seen: dict[str, str] = {}
    for entry, item in _candidates(images_dir):
        path = item.path
        if entry.is_symlink() and not link_allowed(path, images_dir.parent):
            yield item, f"link escapes the dataset (to {os.readlink(path)})"
        elif path.is_dir():
            if item.concept or not repeats_folder(path.name):
                yield item, SUBFOLDER
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            yield item, f"unsupported type '{path.suffix}'"
        elif path.stat().st_size == 0:
            yield item, "empty file (0 bytes)"
        elif (name := match_key(item.file)) in seen:
            yield item, collision(item, seen[name])
        else:
            seen[name] = item.source
            yield item, None


def collision(item: Listed, other: str) -> str:
    """The quarantine reason of a file whose resized name another file has already."""
    if not item.concept and other.count("/") == 1:
        return (
            f"same name as {other} apart from case or extension "
            "(outputs and captions are matched by name): rename one"
        )
    return (
        f"resized as {item.file}, like {other} (outputs and captions are matched by name): "
        "rename one"
    )


def prepare(task: Task) -> dict[str, Any]:
    """Process one image into its cache entry; the entry's record (or a quarantine reason)."""
    settings = task.settings
    try:
        with open_image(Path(task.source)) as image:
            size = displayed_size(image)
            if min(size) < settings.smallest:
                raise Unusable(
                    f"too small: {size[0]}×{size[1]} px (resize.min_side is {settings.smallest})"
                )
            spec = settings.buckets
            bucket = bucket_for(size, spec, bucket_sizes(spec))
            decoded = decode(image, bucket)
            pixels = fit(to_rgb(decoded, settings.background), bucket)
            mask = fitted_mask(decoded, task.mask, size, bucket)
    except Unusable as error:
        record: dict[str, Any] = {"reason": str(error)}
    except Exception as error:  # a decoder's own failure must not stop the dataset
        record = {"reason": f"could not be processed ({type(error).__name__}: {error})"}
    else:
        write_png(pixels, f"{task.entry}.png")
        record = {"original_size": list(size), "bucket": list(bucket)}
        if mask is not None:
            write_png(mask, f"{task.entry}.mask.png")
            record["mask"] = MASKS if task.mask else ALPHA
    write_json(f"{task.entry}.json", record)
    return record


def write_png(image: Any, path: str) -> None:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_LEVEL)
    write_bytes(path, buffer.getvalue())


def run_all(tasks: list[Task], threads: int) -> list[dict[str, Any]]:
    if threads <= 1 or len(tasks) <= 1:
        return [prepare(task) for task in tasks]
    with ProcessPoolExecutor(max_workers=min(threads, len(tasks))) as pool:
        return list(pool.map(prepare, tasks))


def cached(entry: Path) -> dict[str, Any] | None:
    try:
        record = json.loads(entry.with_suffix(".json").read_text())
    except (OSError, ValueError):
        return None
    usable = "reason" in record or entry.with_suffix(".png").is_file()
    if "mask" in record and not entry.with_suffix(".mask.png").is_file():
        usable = False
    return record if usable else None


def write_quarantine(path: Path, quarantined: list[dict[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows([q["source"], q["reason"]] for q in quarantined)


@dataclass
class Found:
    """An image to train on: its file, its cache entry, and the entry's record once known."""

    item: Listed
    digest: str  # of the source file
    entry: Path
    record: dict[str, Any] | None
    mask: Path | None = None  # its mask file, relative to masks/

    def names(self) -> dict[str, Any]:
        """Its manifest entry's names; a repeats folder's image adds its repeats and concept
        (a plain image's entry stays as it was)."""
        item = self.item
        names = {"file": item.file, "source": item.source, "sha256": self.digest}
        kohya = {"repeats": item.repeats, "concept": item.concept} if item.concept else {}
        return names | kohya | self.mask_source()

    def mask_source(self) -> dict[str, str]:
        """Its manifest entry's mask: its mask file, or its own transparency."""
        kind = (self.record or {}).get("mask")
        if kind == MASKS and self.mask is not None:
            return {"mask": f"{MASKS}/{self.mask.as_posix()}"}
        return {"mask": ALPHA} if kind == ALPHA else {}


def survey(
    images_dir: Path, chosen: Settings, cache_dir: Path, code: str, hashes: HashCache
) -> tuple[dict[str, Found], list[dict[str, str]]]:
    """The images by source (``images/<name>``), each with its mask file and its cached record
    where there is one, and what is quarantined before decoding anything."""
    found: dict[str, Found] = {}
    quarantined, by_hash, settings = [], {}, asdict(chosen)
    masks_dir = images_dir.parent / MASKS
    masks = mask_files(masks_dir if masks_dir.is_dir() else None)
    for item, reason in listed(images_dir):
        source = item.source
        digest = None if reason else hashes.file(item.path)
        if digest in by_hash:
            reason = f"duplicate of {by_hash[digest]} (identical bytes)"
        if reason:
            quarantined.append({"source": source, "reason": reason})
            continue
        by_hash[digest] = source
        mask = mask_of(source, masks)
        key = {"image": digest, "settings": settings}
        key |= {"mask": hashes.file(mask)} if mask else {}
        found[source] = lookup(item, key, cache_dir, code)
        found[source].mask = mask.relative_to(masks_dir) if mask else None
    if unused := orphans(masks, {masks_dir / f.mask for f in found.values() if f.mask}):
        log.warning("masks: %d file(s) no image is named as: %s", len(unused), ", ".join(unused))
    return found, quarantined


def lookup(item: Listed, key: dict[str, Any], cache_dir: Path, code: str) -> Found:
    """The image's cache entry (``key``: its content and settings) under this code, else
    under older code that makes the same pixels (loramill.prepare.same_pixels); a new entry is
    made under this code."""
    codes = (code, *SAME_PIXELS.get(code, ()))
    keys = [hash_value({**key, "code": c}) for c in codes]
    entries = [cache_dir / key[:2] / key for key in keys]
    for entry in entries:
        if (record := cached(entry)) is not None:
            return Found(item, key["image"], entry, record)
    return Found(item, key["image"], entries[0], None)


def resize_dataset(
    images_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    settings: dict[str, Any],
    quarantine_csv: str | os.PathLike | None = None,
    name: str = "",
    threads: int = 1,
    cache_dir: str | os.PathLike = CACHE_DIR,
    code: str = "",
    hashes: HashCache | None = None,
) -> dict[str, Any]:
    """Write ``<stem>.png`` per usable image and ``manifest.json`` into ``out_dir``.

    ``settings`` is the ``resize`` config section; ``code`` identifies the stage's code in
    the per-image cache keys; ``name`` is the dataset's, for the log line only."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise LoramillError(f"{images_dir}: image folder does not exist")
    chosen, hashes = Settings.from_config(settings), hashes or HashCache()
    found, quarantined = survey(images_dir, chosen, Path(cache_dir), code, hashes)
    todo = [f for f in found.values() if f.record is None]
    masks = images_dir.parent / MASKS
    tasks = [Task(str(f.item.path), str(f.entry), chosen, f.mask and str(masks / f.mask))
             for f in todo]  # fmt: skip
    for image, record in zip(todo, run_all(tasks, threads), strict=True):
        image.record = record

    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for source, image in found.items():
        if "reason" in image.record:
            quarantined.append({"source": source, "reason": image.record["reason"]})
            continue
        with atomic_path(out_dir / image.item.file) as tmp:
            link_data(str(image.entry.with_suffix(".png")), str(tmp), share=True)
        if "mask" in image.record:  # masks/<file>, beside the image
            (out_dir / MASKS).mkdir(exist_ok=True)
            with atomic_path(out_dir / MASKS / image.item.file) as tmp:
                link_data(str(image.entry.with_suffix(".mask.png")), str(tmp), share=True)
        size, bucket = image.record["original_size"], image.record["bucket"]
        crop = {"crop_top_left": list(crop_top_left(size, bucket))}
        record = {k: v for k, v in image.record.items() if k != "mask"}  # names() says it
        images.append({**image.names(), **record, **crop})
    quarantined.sort(key=lambda q: q["source"])
    report(quarantined, quarantine_csv)
    hashes.save()
    if not images:
        raise LoramillError(f"{images_dir}: no usable images ({len(quarantined)} quarantined)")
    manifest = {
        "resolution": chosen.buckets.resolution,
        "settings": asdict(chosen),
        "images": images,
        "quarantined": quarantined,
    }
    write_json(out_dir / MANIFEST, manifest)
    kinds = [image["mask"] for image in images if "mask" in image]
    if kinds:
        log.info("masks: %d from %s/, %d from transparency", len(kinds) - kinds.count(ALPHA),
                 MASKS, kinds.count(ALPHA))  # fmt: skip
    new = sum("reason" not in image.record for image in todo)
    counts = (new, len(images) - new, len(quarantined))
    log.info(
        "resize %s: %d new, %d reused, %d quarantined", name or images_dir.parent.name, *counts
    )
    return manifest


def report(quarantined: list[dict[str, str]], quarantine_csv: str | os.PathLike | None) -> None:
    if quarantined:
        reasons = "; ".join(f"{q['source']}: {q['reason']}" for q in quarantined)
        log.warning("quarantined %d file(s): %s", len(quarantined), reasons)
    if quarantine_csv is not None:
        write_quarantine(Path(quarantine_csv), quarantined)
