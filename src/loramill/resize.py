"""Stage 1: bring every image of a dataset to the training resolution.

Each image is EXIF-rotated, converted to RGB (transparency composited on white, the usual
convention of SD trainers), center-cropped to a square and resized with Lanczos. A file that
cannot be used is quarantined: left untouched in the dataset, listed with its reason in the
manifest and the log, and skipped. Pillow's decompression-bomb limit stays on.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from loramill import LoramillError
from loramill.dataset_files import entries
from loramill.files import atomic_path, inside, write_json

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
MANIFEST = "manifest.json"
WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with any transparency flattened onto white."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything to white.
        image = image.point(lambda v: v / 256).convert("L")
    return image.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Open, fully decode and orient an image; raise ValueError with a readable reason."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                opened.load()
                return ImageOps.exif_transpose(opened)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ValueError(f"decompression-bomb limit: {error}") from None
    except UnidentifiedImageError:
        raise ValueError("not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError) as error:
        raise ValueError(f"corrupt image: {error}") from None


def center_square(image: Image.Image, resolution: int) -> Image.Image:
    return ImageOps.fit(image, (resolution, resolution), method=Image.Resampling.LANCZOS)


def list_sources(images_dir: Path) -> tuple[list[Path], list[dict[str, str]]]:
    """Candidate image files, plus entries that are quarantined on sight."""
    sources, quarantined = [], []
    for entry in entries(images_dir, "images"):
        path = Path(entry.path)
        relative = path.relative_to(images_dir.parent).as_posix()
        if path.is_dir():
            quarantined.append({"source": relative, "reason": "subfolders are not read"})
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            quarantined.append({"source": relative, "reason": f"unsupported type '{path.suffix}'"})
        else:
            sources.append(path)
    return sources, quarantined


def resize_dataset(
    images_dir: str | os.PathLike, out_dir: str | os.PathLike, resolution: int
) -> dict[str, Any]:
    """Write ``<stem>.png`` per usable image and ``manifest.json`` into ``out_dir``."""
    images_dir, out_dir = Path(images_dir), Path(out_dir)
    if not images_dir.is_dir():
        raise LoramillError(f"{images_dir}: image folder does not exist")
    dataset_root = images_dir.parent
    sources, quarantined = list_sources(images_dir)

    by_stem: dict[str, Path] = {}
    for path in sources:
        if path.stem in by_stem:
            raise LoramillError(
                f"{by_stem[path.stem]} and {path}: two images share the name '{path.stem}'; "
                "rename one (captions are matched by name)"
            )
        by_stem[path.stem] = path

    out_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for stem, path in by_stem.items():
        relative = path.relative_to(dataset_root).as_posix()
        try:
            inside(dataset_root, path.relative_to(dataset_root))
            image = load_image(path)
        except (ValueError, LoramillError) as error:
            quarantined.append({"source": relative, "reason": str(error)})
            continue
        original_size = list(image.size)
        resized = center_square(to_rgb(image), resolution)
        with atomic_path(out_dir / f"{stem}.png") as tmp:
            resized.save(tmp, format="PNG")
        images.append({"file": f"{stem}.png", "source": relative, "original_size": original_size})

    for entry in quarantined:
        log.warning("quarantined %s: %s", entry["source"], entry["reason"])
    if not images:
        raise LoramillError(f"{images_dir}: no usable images ({len(quarantined)} quarantined)")
    manifest = {"resolution": resolution, "images": images, "quarantined": quarantined}
    write_json(out_dir / MANIFEST, manifest)
    log.info(
        "resized %d images to %d px, quarantined %d", len(images), resolution, len(quarantined)
    )
    return manifest
