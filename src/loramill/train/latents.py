"""Content-keyed on-disk caches of what the frozen encoders compute: VAE latents per image and
text-encoder outputs per caption.

Training then holds one batch of latents at a time, whatever the dataset's size, and a second
training of the same images (another learning rate, more steps) encodes nothing. Entries live
under ``.cache/`` (gitignored), are shared by every run and dataset, and are keyed by what
decides their bits: the input's content, the encoder's weights, the dtype, the device type,
the batch shape and the library versions. Each entry is one safetensors file, written
atomically, so parallel jobs and killed jobs never leave a half entry behind.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from loramill.files import save_safetensors
from loramill.hashing import hash_value

log = logging.getLogger(__name__)
CACHE_ROOT = Path(".cache")


class TensorCache:
    """Tensors by key, one ``<root>/<key[:2]>/<key>.safetensors`` file per entry."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def __contains__(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.path(key))

    def save(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        save_safetensors(
            {k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, self.path(key)
        )


@dataclass(frozen=True)
class Counts:
    encoded: int
    reused: int

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.encoded + other.encoded, self.reused + other.reused)

    def line(self, what: str) -> str:
        return f"{what}: {self.encoded} encoded, {self.reused} reused"


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def to_pixels(images: Sequence[Image.Image]) -> torch.Tensor:
    """Equal-sized images as the [-1, 1] float tensor (N, 3, H, W) SD's VAE takes."""
    arrays = [np.asarray(image.convert("RGB")) for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def read_pixels(paths: Sequence[Path], flip: bool = False) -> torch.Tensor:
    """Images (mirrored left to right with ``flip``) as a [-1, 1] float tensor (N, 3, H, W);
    only these images are in memory."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
            images.append(rgb.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else rgb)
    return to_pixels(images)


def latent_keys(image_hashes: Sequence[str], encoder: dict[str, Any]) -> list[str]:
    """One cache key per image: its content hash plus everything about the encoder."""
    return [hash_value({"latent": image, **encoder}) for image in image_hashes]


def encode_latents(
    vae: Any,
    cache: TensorCache,
    keys: Sequence[str],
    paths: Sequence[Path],
    batch_size: int,
    flip: bool = False,
) -> Counts:
    """Encode the images whose latents are not cached, ``batch_size`` images per call.

    The last chunk is padded with copies of its last image, so every call has the same shape
    and a latent's bits do not depend on how many images happened to need encoding.
    """
    todo = [(key, path) for key, path in zip(keys, paths, strict=True) if key not in cache]
    for chunk in chunks(todo, batch_size):
        chunk_paths = [path for _, path in chunk]
        chunk_paths += [chunk_paths[-1]] * (batch_size - len(chunk_paths))
        pixels = read_pixels(chunk_paths, flip).to(vae.device, vae.dtype)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        for index, (key, _) in enumerate(chunk):
            cache.save(key, {"mean": dist.mean[index], "std": dist.std[index]})
    return Counts(len(todo), len(keys) - len(todo))


def text_keys(captions: Sequence[str], encoder: dict[str, Any], clip_skip: int = 1) -> list[str]:
    """One cache key per caption; ``clip_skip`` is the CLIP layer counted from the last."""
    return [
        hash_value({"caption": caption, "clip_layer": clip_skip, **encoder}) for caption in captions
    ]


def encode_texts(
    encode: Callable[[Sequence[str]], dict[str, torch.Tensor]],
    cache: TensorCache,
    keys: Sequence[str],
    captions: Sequence[str],
) -> Counts:
    """Encode each caption whose conditioning is not cached, one caption per call (the same
    shape every time, as for latents). Equal captions share one entry."""
    todo = dict(
        (key, caption) for key, caption in zip(keys, captions, strict=True) if key not in cache
    )
    for key, caption in todo.items():
        with torch.no_grad():
            cache.save(key, {name: value[0] for name, value in encode([caption]).items()})
    return Counts(len(todo), len(set(keys)) - len(todo))


def load_batch(cache: TensorCache, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """One batch of cached entries, each tensor stacked over the batch."""
    entries = [cache.load(key) for key in keys]
    return {name: torch.stack([entry[name] for entry in entries]) for name in entries[0]}
