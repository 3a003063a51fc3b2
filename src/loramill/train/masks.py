"""The masks a run weights its loss by (train.masked_loss, alpha_mask; the resize stage made
them: loramill.prepare.masks): which examples have one, and a batch's masks at latent size,
mirrored with their images."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from loramill.prepare.masks import ALPHA, MASKS

log = logging.getLogger(__name__)


def mask_paths(cfg: Any, images: list[Path], entries: list[dict[str, Any]]) -> list[Path | None]:
    """Each example's resized mask (``masks/<file>`` beside it) when the run uses it: a mask
    file's with masked_loss, a transparency's with alpha_mask too; logs how many weigh 1."""
    if not cfg.masked_loss:
        return [None] * len(images)
    used = {kind for kind, on in ((MASKS, True), (ALPHA, cfg.alpha_mask)) if on}
    kinds = [ALPHA if e.get("mask") == ALPHA else MASKS if "mask" in e else None for e in entries]
    kinds = [kind if kind in used else None for kind in kinds]
    paths = [p.parent / MASKS / p.name if k else None for p, k in zip(images, kinds, strict=True)]
    files, alphas = kinds.count(MASKS), kinds.count(ALPHA)
    log.info("masked_loss: %d images masked (%d by %s/ files, %d by transparency), %d "
             "without a mask weigh 1 everywhere", files + alphas, files, MASKS, alphas,
             kinds.count(None))  # fmt: skip
    return paths


def batch_masks(
    paths: list[Path | None], flips: list[bool], latent_size: tuple[int, int]
) -> torch.Tensor | None:
    """The batch's masks, B × 1 × h × w in [0, 1], each mirrored when its image is and
    averaged down to the latent's size (kohya: area interpolation); None when no image of the
    batch has one."""
    if all(path is None for path in paths):
        return None
    rows = []
    for path, flip in zip(paths, flips, strict=True):
        if path is None:
            rows.append(None)
            continue
        with Image.open(path) as image:
            mask = torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255)
        rows.append(mask.flip(-1) if flip else mask)
    size = next(row.shape for row in rows if row is not None)
    full = torch.ones(size)
    stacked = torch.stack([full if row is None else row for row in rows]).unsqueeze(1)
    return F.interpolate(stacked, size=latent_size, mode="area")
