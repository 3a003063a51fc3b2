"""Captions as training sees them, step by step (kohya's option names).

Per draw of an example, in this order: ``caption_prefix`` and ``caption_suffix`` are added;
with probability ``caption_dropout_rate`` the whole caption becomes empty (the
unconditional case); otherwise the caption is split into tags at commas, the fixed part kept
in place — everything before ``keep_tokens_separator`` when the caption holds it, else the
first ``keep_tokens`` tags — and each other tag is dropped with probability
``caption_tag_dropout_rate``, then, with ``shuffle_caption``, the remaining ones are
shuffled. Every draw comes from the run's seeded generator, so runs stay bit-reproducible and
resume exactly. Captions that vary per step cannot use the text-embedding cache: training
then encodes them every step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class CaptionVariation:
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""

    @classmethod
    def from_config(cls, train: Any) -> CaptionVariation:
        return cls(**{name: getattr(train, name) for name in cls.__dataclass_fields__})

    @property
    def varies(self) -> bool:
        """Whether a caption can differ from one step to the next."""
        rates = self.caption_dropout_rate or self.caption_tag_dropout_rate
        return bool(self.shuffle_caption or rates)

    def fixed(self, caption: str) -> str:
        return f"{self.caption_prefix}{caption}{self.caption_suffix}"

    def split(self, caption: str) -> tuple[list[str], list[str]]:
        """(kept in place, free) tags."""
        separator = self.keep_tokens_separator
        if separator and separator in caption:
            head, tail = caption.split(separator, 1)
            return _tags(head), _tags(tail)
        tags = _tags(caption)
        return tags[: self.keep_tokens], tags[self.keep_tokens :]

    def draw(self, caption: str, generator: torch.Generator) -> str:
        """The caption for one step."""
        caption = self.fixed(caption)
        if not self.varies:
            return caption
        if self.caption_dropout_rate and _uniform(generator) < self.caption_dropout_rate:
            return ""
        kept, free = self.split(caption)
        if self.caption_tag_dropout_rate:
            free = [t for t in free if _uniform(generator) >= self.caption_tag_dropout_rate]
        if self.shuffle_caption and len(free) > 1:
            free = [free[i] for i in torch.randperm(len(free), generator=generator).tolist()]
        return ", ".join(kept + free)


def _tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))
