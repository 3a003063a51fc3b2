"""Loss masks (train.masked_loss; kohya's masked_loss and alpha_mask): which mask an image has,
and the mask brought to the image's training size.

A mask is a greyscale file of ``data/<ds>/masks/`` named as its image (any image type:
``masks/cat.png`` for ``images/cat.jpg``; ``masks/5_sks dog/x.png`` for an image of a kohya
repeats folder), or else the image's own alpha channel when it has transparency. It goes
through exactly what its image goes through — orientation, the cover resize to the bucket and
the middle crop — so each mask pixel stays on its image pixel; white weighs 1, black 0. A
mask file of another size than its image is quarantined with the image.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from PIL import Image

from loramill.dataset_files import (
    IMAGE_SUFFIXES,
    entries,
    link_allowed,
    match_key,
    repeats_folder,
)
from loramill.prepare.pixels import Unusable, decode, displayed_size, fit, open_image

log = logging.getLogger(__name__)

MASKS = "masks"  # the dataset's folder of mask files, beside images/
ALPHA = "alpha"  # the manifest's word for a mask taken from the image's transparency


def mask_files(masks_dir: str | os.PathLike | None) -> dict[tuple[str, str], Path]:
    """The dataset's mask files by (repeats folder or "", name without extension), as images
    are matched (loramill.dataset_files.match_key); links leading out of the dataset are
    left out, with a warning."""
    found: dict[tuple[str, str], Path] = {}
    if masks_dir is None:
        return found
    root = Path(masks_dir).parent
    for entry in entries(masks_dir, MASKS):
        inner = entries(entry.path, MASKS) if entry.is_dir() and repeats_folder(entry.name) else []
        listed = [(entry.name, e) for e in inner] if inner else [("", entry)]
        for folder, item in listed:
            if item.is_symlink() and not link_allowed(item.path, root):
                log.warning("masks: %s is a link out of the dataset; not read", item.path)
            elif item.is_file() and Path(item.name).suffix.lower() in IMAGE_SUFFIXES:
                found[(folder, match_key(item.name))] = Path(item.path)
    return found


def mask_of(source: str, masks: dict[tuple[str, str], Path]) -> Path | None:
    """The mask file of the image ``images/<name>`` or ``images/<repeats folder>/<name>``."""
    parts = source.split("/")[1:]
    folder = parts[0] if len(parts) == 2 else ""
    return masks.get((folder, match_key(parts[-1])))


def orphans(masks: dict[tuple[str, str], Path], used: set[Path]) -> list[str]:
    """Mask files no image of the dataset is named as."""
    return sorted(str(path) for path in masks.values() if path not in used)


def fitted_mask(
    image: Image.Image, mask_path: str | None, size: tuple[int, int], bucket: tuple[int, int]
) -> Image.Image | None:
    """The image's mask at its bucket, greyscale: from ``mask_path``, else from the decoded
    ``image``'s transparency; None when it has neither (every pixel weighs 1)."""
    if mask_path is None:
        alpha = transparency(image)
        return None if alpha is None else fit(alpha, bucket)
    with open_image(Path(mask_path)) as mask:
        found = displayed_size(mask)
        if found != size:
            raise Unusable(
                f"its mask {MASKS}/{Path(mask_path).name} is {found[0]}×{found[1]} px and the "
                f"image {size[0]}×{size[1]}: a mask must be its image's size"
            )
        return fit(decode(mask, bucket).convert("L"), bucket)


def transparency(image: Image.Image) -> Image.Image | None:
    """The alpha channel of an image that has transparent pixels, else None."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode not in ("RGBA", "LA", "PA"):
        return None
    alpha = image.getchannel("A")
    return None if alpha.getextrema()[0] == 255 else alpha
