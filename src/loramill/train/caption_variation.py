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

import torch

from loramill.train.config import TrainConfig


class CaptionVariation:
    """The caption options of a TrainConfig (their one definition), applied per draw."""

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg

    @property
    def varies(self) -> bool:
        """Whether a caption can differ from one step to the next."""
        cfg = self.cfg
        return bool(cfg.shuffle_caption or cfg.caption_dropout_rate or cfg.caption_tag_dropout_rate)

    def fixed(self, caption: str) -> str:
        return f"{self.cfg.caption_prefix}{caption}{self.cfg.caption_suffix}"

    def split(self, caption: str) -> tuple[list[str], list[str]]:
        """(kept in place, free) tags."""
        separator, keep = self.cfg.keep_tokens_separator, self.cfg.keep_tokens
        if separator and separator in caption:
            head, tail = caption.split(separator, 1)
            return _tags(head), _tags(tail)
        tags = _tags(caption)
        return tags[:keep], tags[keep:]

    def draw(self, caption: str, generator: torch.Generator) -> str:
        """The caption for one step."""
        cfg, caption = self.cfg, self.fixed(caption)
        if not self.varies:
            return caption
        if cfg.caption_dropout_rate and _uniform(generator) < cfg.caption_dropout_rate:
            return ""
        kept, free = self.split(caption)
        if cfg.caption_tag_dropout_rate:
            free = [t for t in free if _uniform(generator) >= cfg.caption_tag_dropout_rate]
        if cfg.shuffle_caption and len(free) > 1:
            free = [free[i] for i in torch.randperm(len(free), generator=generator).tolist()]
        return ", ".join(kept + free)


def _tags(text: str) -> list[str]:
    return [tag.strip() for tag in text.split(",") if tag.strip()]


def _uniform(generator: torch.Generator) -> float:
    return float(torch.rand((), generator=generator))
