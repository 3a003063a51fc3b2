"""Training data: the examples a run trains on, and their cached encodings.

An example is a resized image, its caption and its bucket (the size it was resized to).
Latents are encoded bucket by bucket, so every encoder call has one shape, and cached on disk
(loramill.train.latents): training then holds one batch at a time whatever the dataset's size.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from loramill import LoramillError
from loramill.dataset_files import MANIFEST
from loramill.devices import on_device
from loramill.files import read_jsonl
from loramill.hashing import HashCache
from loramill.model_files import component_fingerprint
from loramill.models.base_model import pipeline_family, text_parts
from loramill.prepare.buckets import Size
from loramill.software import installed
from loramill.train.caption_variation import CaptionVariation
from loramill.train.config import TrainConfig
from loramill.train.latents import (
    Counts,
    TensorCache,
    encode_latents,
    encode_texts,
    latent_keys,
    text_keys,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Examples:
    images: list[Path]
    captions: list[str]
    buckets: list[Size]
    resolution: int
    repeats: list[int]  # per image: its kohya repeats folder's count, else 1
    entries: list[dict[str, Any]]  # per image: its manifest entry (sizes, crop)
    # per image: whether it is a regularization image (loramill.train.regularization), whose
    # repeats are its appearances per epoch
    reg: list[bool]

    def times(self, repeats: int) -> list[int]:
        """Each image's appearances per epoch: its folder's repeats × ``train.repeats``; a
        regularization image's, as kohya's ratio gave them."""
        return [
            own if reg else own * repeats for own, reg in zip(self.repeats, self.reg, strict=True)
        ]


def read_examples(resized_dir: Path, captions_jsonl: Path) -> Examples:
    """The examples in caption order, with the base resolution; no pixels are read."""
    manifest = json.loads((resized_dir / MANIFEST).read_text())
    entries = {entry["file"]: entry for entry in manifest["images"]}
    bucket = {file: tuple(entry["bucket"]) for file, entry in entries.items()}
    repeats = {file: entry.get("repeats", 1) for file, entry in entries.items()}
    records = read_jsonl(captions_jsonl)
    missing = [r["image"] for r in records if r["image"] not in bucket]
    if missing:
        raise LoramillError(f"{captions_jsonl}: caption for unknown image '{missing[0]}'")
    if not records:
        raise LoramillError(f"{captions_jsonl}: no captioned images to train on")
    return Examples(
        images=[resized_dir / r["image"] for r in records],
        captions=[r["caption"] for r in records],
        buckets=[bucket[r["image"]] for r in records],
        resolution=manifest["resolution"],
        repeats=[repeats[r["image"]] for r in records],
        entries=[entries[r["image"]] for r in records],
        reg=[False] * len(records),
    )


def subset(examples: Examples, chosen: list[bool]) -> Examples:
    """The examples whose entry in ``chosen`` is true, in their order."""
    lists = {
        f.name: [v for v, keep in zip(getattr(examples, f.name), chosen, strict=True) if keep]
        for f in fields(examples)
        if f.name != "resolution"
    }
    return Examples(**lists, resolution=examples.resolution)


def split_value(image_hash: str) -> float:
    """Where an image falls in [0, 1) for validation_split: from its content alone, so
    adding or removing other images moves none of the others across the split."""
    digest = hashlib.sha256(f"loramill validation_split:{image_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def held_out(image_hashes: list[str], fraction: float) -> list[bool]:
    """Which images validation_split ``fraction`` holds out: those whose split_value falls
    below it, and at least one (the lowest) when the fraction is above 0."""
    if not fraction:
        return [False] * len(image_hashes)
    values = [split_value(h) for h in image_hashes]
    chosen = [value < fraction for value in values]
    if values and not any(chosen):
        chosen[values.index(min(values))] = True
    return chosen


def split(examples: Examples, fraction: float, hashes: HashCache) -> tuple[Examples, Examples]:
    """The examples to train on and those validation_split holds out."""
    chosen = held_out([hashes.file(path) for path in examples.images], fraction)
    kept = subset(examples, [not held for held in chosen])
    if fraction and not kept.images:
        raise LoramillError(
            f"train.validation_split {fraction}: it holds out all {len(chosen)} images, and "
            "none is left to train on; lower it, add images or use a validation folder"
        )
    return kept, subset(examples, chosen)


class Encoded:
    """Cache keys of every example's latent and (frozen text encoder) text embedding."""

    def __init__(
        self,
        pipe: Any,
        examples: Examples,
        cfg: TrainConfig,
        base_model: str,
        device: Any,
        cache_root: Path,
        hashes: HashCache,
    ) -> None:
        # What decides an encoding's bits besides the input: CPU kernels split work by thread
        # count, so it belongs to the key like the device type and the library versions.
        self.versions = versions = {
            "torch": torch.__version__,
            "diffusers": installed(("diffusers",))["diffusers"],
            "threads": torch.get_num_threads() if device.type == "cpu" else None,
        }
        # float32 whatever the training precision: encoding happens once per image, and
        # half-precision VAEs are known to overflow.
        encoder = {
            "vae": component_fingerprint(base_model, "vae", hashes),
            "dtype": "float32",
            "device": device.type,
            "batch": cfg.vae_batch_size,
            "versions": versions,
        }
        self.latents = TensorCache(cache_root / "latents")
        self.latent_keys: list[str] = []
        self.flipped_keys: list[str] = []
        if cfg.cache_latents:
            with on_device([pipe.vae], device):
                self._encode_latents(pipe.vae, examples, encoder, cfg, hashes)
        self.scaling = pipe.vae.config.scaling_factor
        self.shift = pipe.vae.config.get("shift_factor") or 0.0  # Flux's VAE; SD's have none
        self.texts: TensorCache | None = None
        self.text_keys: list[str] = []
        variation = CaptionVariation(cfg)
        if not cfg.train_text_encoder and not variation.varies:
            self._encode_texts(pipe, examples, cfg, base_model, device, cache_root, hashes)

    def _encode_texts(
        self, pipe: Any, examples: Examples, cfg: TrainConfig, base_model: str, device: Any,
        cache_root: Path, hashes: HashCache,
    ) -> None:  # fmt: skip
        """Cache every caption's conditioning by the frozen text encoders (SDXL's two)."""
        family = pipeline_family(pipe)
        text_encoder: dict[str, Any] = {
            name: component_fingerprint(base_model, name, hashes)
            for name in (*family.tokenizers, *family.text_encoders)
        }
        text_encoder |= {"device": device.type, "versions": self.versions}
        tokenizers, encoders = text_parts(pipe)
        # an encoder loaded in half precision (Flux's T5 under mixed precision) gives other bits
        half = {n: str(e.dtype) for n, e in zip(family.text_encoders, encoders, strict=True)
                if e.dtype != torch.float32}  # fmt: skip
        text_encoder |= {"dtypes": half} if half else {}
        self.texts = TensorCache(cache_root / "text_embeddings")
        captions = [CaptionVariation(cfg).fixed(caption) for caption in examples.captions]
        how = family.conditioning(cfg)
        self.text_keys = text_keys(captions, text_encoder, how)
        encode = lambda texts: family.encode(tokenizers, encoders, texts, how)  # noqa: E731
        with on_device(encoders, device):
            counts = encode_texts(encode, self.texts, self.text_keys, captions)
        log.info("%s", counts.line("text embeddings"))

    def _encode_latents(
        self, vae: Any, examples: Examples, encoder: dict, cfg: TrainConfig, hashes: HashCache
    ) -> None:
        """Cache every image's latent, bucket by bucket (one shape per encoder call), and with
        flip_aug its mirror image's too."""
        images = examples.images
        image_hashes = [hashes.file(p) for p in images]
        self.latent_keys = latent_keys(image_hashes, encoder)
        flipped = latent_keys(image_hashes, {**encoder, "flip": True}) if cfg.flip_aug else []
        self.flipped_keys = flipped
        counts = Counts(0, 0)
        for flip, keys_of in ((False, self.latent_keys), (True, flipped)):
            for bucket in sorted(set(examples.buckets)) if keys_of else []:
                chosen = [i for i, b in enumerate(examples.buckets) if b == bucket]
                keys, paths = [keys_of[i] for i in chosen], [images[i] for i in chosen]
                counts += encode_latents(vae, self.latents, keys, paths, cfg.vae_batch_size, flip)
        log.info("%s", counts.line("latents"))
