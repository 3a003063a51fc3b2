"""Captions into CLIP token ids and hidden states, the way kohya reads long captions; shared by
the families whose text encoders are CLIPs (loramill.models.sd, loramill.models.sdxl)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Conditioning:
    """How captions become the UNet's conditioning (kohya's options).

    ``clip_skip`` N takes CLIP's N-th layer from the last through the final layer norm
    (NovelAI-style models use 2; SD 1.x/2.x only). ``max_token_length`` 150 or 225 reads
    longer captions the way kohya does: the tokens are cut into chunks of 75, each encoded
    between its own start and end tokens, and the hidden states are joined, keeping the first
    start and the last end token (sequence length ``max_token_length`` + 2).
    """

    clip_skip: int = 1
    max_token_length: int = 75


CHUNK = 75  # tokens CLIP reads between its start and end tokens


def tokenize(tokenizer: Any, captions: Sequence[str], how: Conditioning, device: Any) -> Any:
    """Token ids (one row per caption), padded to ``max_token_length`` + 2."""
    return tokenizer(
        list(captions),
        padding="max_length",
        max_length=how.max_token_length + 2,
        truncation=True,
        return_tensors="pt",
    ).input_ids.to(device)


def chunked(
    tokens: torch.Tensor, how: Conditioning, encode: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """The hidden states of ``tokens``: one ``encode`` call, or one per chunk of 75 tokens
    joined as kohya joins them (the first call is the first chunk's)."""
    if how.max_token_length <= CHUNK:
        return encode(tokens)
    start, end = tokens[:, :1], tokens[:, -1:]
    parts = []
    for first in range(1, how.max_token_length + 1, CHUNK):
        chunk = torch.cat([start, tokens[:, first : first + CHUNK], end], dim=1)
        hidden = encode(chunk)
        keep_start = first == 1
        keep_end = first + CHUNK > how.max_token_length
        parts.append(hidden[:, (0 if keep_start else 1) : (None if keep_end else -1)])
    return torch.cat(parts, dim=1)
