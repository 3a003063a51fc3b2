"""How Flux's transformer reads latents: 16-channel VAE latents packed 2 × 2 into a sequence of
64-wide tokens, each with its (row, column) position for the rotary embedding, as diffusers'
``FluxPipeline`` and kohya's ``flux_utils`` lay them out (the same order in both)."""

from __future__ import annotations

import torch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(batch, channels, height, width) → (batch, height/2 · width/2, channels · 4)."""
    batch, channels, height, width = latents.shape
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    return patches.permute(0, 2, 4, 1, 3, 5).reshape(batch, (height // 2) * (width // 2), -1)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack`` for latents ``height`` × ``width``."""
    batch, _, features = tokens.shape
    patches = tokens.view(batch, height // 2, width // 2, features // 4, 2, 2)
    return patches.permute(0, 3, 1, 4, 2, 5).reshape(batch, features // 4, height, width)


def image_ids(height: int, width: int) -> torch.Tensor:
    """Each packed token's position, (0, row, column), for latents ``height`` × ``width``."""
    rows, columns = height // 2, width // 2
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3)
