"""How close a set of generated images is to a LoRA's training images.

The statistic is the **edge-orientation distance**: every image is described by the direction
of its colour edges — the gradient magnitude of each RGB channel summed into 8 orientation bins
over 0–180°, normalised to sum to 1 — and two sets of images are as far apart as the L1
distance between their mean distributions (0 = the same directions, 2 = disjoint). Diagonal
stripes put nearly all their edges into one diagonal bin, horizontal bands into the horizontal
one, a shape on a plain background spreads them over all bins; where the shape sits does not
matter. It measures the direction of structure only: colour and brightness are not in it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image

BINS = 8


def edge_histogram(image: Image.Image, size: int | None = None) -> np.ndarray:
    """The image's edge-orientation distribution (``BINS`` values summing to 1; all zero for a
    flat image), after an optional resize to ``size`` × ``size``."""
    image = image.convert("RGB")
    if size and image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float64) / 255.0
    gy, gx = np.gradient(pixels, axis=(0, 1))
    magnitude = np.hypot(gx, gy)
    orientation = np.mod(np.arctan2(gy, gx), np.pi)  # an edge's direction has no sign
    histogram, _ = np.histogram(orientation, bins=BINS, range=(0.0, np.pi), weights=magnitude)
    total = histogram.sum()
    return histogram / total if total > 0 else histogram


def mean_histogram(images: Iterable[Image.Image], size: int | None = None) -> np.ndarray:
    histograms = [edge_histogram(image, size) for image in images]
    if not histograms:
        raise ValueError("no images")
    return np.mean(histograms, axis=0)


def edge_distance(
    images: Iterable[Image.Image], reference: Iterable[Image.Image], size: int = 64
) -> float:
    """Edge-orientation distance between two sets of images (0 = same edge statistics)."""
    return float(np.abs(mean_histogram(images, size) - mean_histogram(reference, size)).sum())
