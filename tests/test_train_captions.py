"""Captions at training time: kohya's shuffle, keep_tokens, dropout, prefix and suffix."""

from __future__ import annotations

import torch

from loramill.train.caption_variation import CaptionVariation
from loramill.train.config import TrainConfig


def variation_of(**options) -> CaptionVariation:
    return CaptionVariation(TrainConfig(**options))


CAPTION = "zzt, red circle, white background, flat, simple"


def draws(variation, n=200, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [variation.draw(CAPTION, generator) for _ in range(n)]


def test_no_options_is_the_caption():
    assert not variation_of().varies
    assert draws(variation_of(), 3) == [CAPTION] * 3
    fixed = variation_of(caption_prefix="photo of ", caption_suffix=", 4k")
    assert not fixed.varies and fixed.draw(CAPTION, torch.Generator()) == f"photo of {CAPTION}, 4k"


def test_shuffle_moves_the_free_tags_only():
    out = draws(variation_of(shuffle_caption=True, keep_tokens=1))
    assert all(o.startswith("zzt, ") for o in out)
    assert all(sorted(o.split(", ")) == sorted(CAPTION.split(", ")) for o in out)
    assert len(set(out)) > 10  # 4! orders of the free tags, most of them seen


def test_separator_fixes_everything_before_it():
    variation = variation_of(shuffle_caption=True, keep_tokens_separator="|||")
    generator = torch.Generator().manual_seed(1)
    out = {variation.draw("zzt, style ||| a, b, c", generator) for _ in range(50)}
    assert all(o.startswith("zzt, style, ") for o in out) and len(out) == 6


def test_dropout_rates():
    empty = draws(variation_of(caption_dropout_rate=0.25), n=2000)
    assert 0.2 < empty.count("") / 2000 < 0.3
    tags = draws(variation_of(caption_tag_dropout_rate=0.5, keep_tokens=1), n=2000)
    free = sum(len(o.split(", ")) - 1 for o in tags) / 2000
    assert all(o.startswith("zzt") for o in tags) and 1.8 < free < 2.2  # 4 free tags, half kept
