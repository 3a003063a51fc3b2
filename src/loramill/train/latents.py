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
from collections.abc import Iterator, Sequence
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


@dataclass(frozen=True)
class Conditioning:
    """How captions become the UNet's conditioning (kohya's options).

    ``clip_skip`` N takes CLIP's N-th layer from the last through the final layer norm
    (NovelAI-style models use 2). ``max_token_length`` 150 or 225 reads longer captions the
    way kohya does: the tokens are cut into chunks of 75, each encoded between its own start
    and end tokens, and the hidden states are joined, keeping the first start and the last
    end token (sequence length ``max_token_length`` + 2).
    """

    clip_skip: int = 1
    max_token_length: int = 75


CHUNK = 75  # tokens CLIP reads between its start and end tokens


def _encode(text_encoder: Any, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip <= 1:
        return text_encoder(tokens)[0]
    hidden = text_encoder(tokens, output_hidden_states=True).hidden_states[-clip_skip]
    # transformers 5's CLIPTextModel holds the norm itself; 4's inside .text_model
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def encode_prompts(
    tokenizer: Any, text_encoder: Any, captions: Sequence[str], how: Conditioning = Conditioning()
) -> torch.Tensor:
    """The UNet's conditioning for ``captions`` (one row each)."""
    tokens = tokenizer(
        list(captions),
        padding="max_length",
        max_length=how.max_token_length + 2,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(text_encoder.device)
    if how.max_token_length <= CHUNK:
        return _encode(text_encoder, tokens, how.clip_skip)
    start, end = tokens[:, :1], tokens[:, -1:]
    parts = []
    for first in range(1, how.max_token_length + 1, CHUNK):
        chunk = torch.cat([start, tokens[:, first : first + CHUNK], end], dim=1)
        hidden = _encode(text_encoder, chunk, how.clip_skip)
        keep_start = first == 1
        keep_end = first + CHUNK > how.max_token_length
        parts.append(hidden[:, (0 if keep_start else 1) : (None if keep_end else -1)])
    return torch.cat(parts, dim=1)


def encode_texts(
    tokenizer: Any,
    text_encoder: Any,
    cache: TensorCache,
    keys: Sequence[str],
    captions: Sequence[str],
    how: Conditioning = Conditioning(),
) -> Counts:
    """Encode each caption whose embedding is not cached, one caption per call (the same
    shape every time, as for latents). Equal captions share one entry."""
    todo = dict(
        (key, caption) for key, caption in zip(keys, captions, strict=True) if key not in cache
    )
    for key, caption in todo.items():
        with torch.no_grad():
            hidden = encode_prompts(tokenizer, text_encoder, [caption], how)[0]
            cache.save(key, {"hidden": hidden})
    return Counts(len(todo), len(set(keys)) - len(todo))


def load_batch(cache: TensorCache, keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """One batch of cached entries, each tensor stacked over the batch."""
    entries = [cache.load(key) for key in keys]
    return {name: torch.stack([entry[name] for entry in entries]) for name in entries[0]}


def prompt_arguments(
    pipe: Any, prompt: str | Sequence[str], negative: str | Sequence[str], how: Any
) -> dict[str, Any]:
    """The pipeline's prompt arguments, for one prompt or a batch. With clip_skip or longer
    captions the embeddings are made here, the way training made them
    (loramill.train.latents.Conditioning; diffusers' own clip_skip expects transformers 4's CLIP
    layout)."""
    if how.clip_skip <= 1 and how.max_token_length <= 75:
        if isinstance(prompt, str):
            return {"prompt": prompt, "negative_prompt": negative or None}
        return {"prompt": list(prompt), "negative_prompt": list(negative)}
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    negatives = [negative] if isinstance(negative, str) else list(negative)
    with torch.no_grad():
        embeds = [encode_prompts(pipe.tokenizer, pipe.text_encoder, texts, how)
                  for texts in (prompts, negatives)]  # fmt: skip
    return {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
