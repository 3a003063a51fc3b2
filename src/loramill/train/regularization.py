"""Regularization (prior-preservation) images, as kohya sd-scripts mixes them in: a set of
images of the class, prepared as a dataset is (``data/<ds>/reg/``, ``train.reg_data``'s folder,
or another dataset's images), trained beside the dataset's so that the class keeps what the
base model knew of it.

kohya's ratio: an epoch holds as many appearances of regularization images as of training
images (each training image's repeats counted). Regularization images take their folders'
repeats in name order until that many are reached; when there are fewer, every one gets one
more appearance per round, in the same order, until there are. They share the buckets — a
batch mixes both — and their loss is multiplied by ``prior_loss_weight``.
"""

from __future__ import annotations

import logging
from dataclasses import fields, replace

from loramill import LoramillError
from loramill.train.config import TrainConfig
from loramill.train.data import Examples, subset

log = logging.getLogger(__name__)


def reg_times(train_appearances: int, reg_repeats: list[int]) -> list[int]:
    """Each regularization image's appearances per epoch (kohya's DreamBoothDataset): its
    repeats, in order, until they add up to ``train_appearances``; then one more for each, in
    order, round after round. An image not reached appears 0 times."""
    times, total, first = [0] * len(reg_repeats), 0, True
    while reg_repeats and total < train_appearances:
        for index, repeats in enumerate(reg_repeats):
            added = repeats if first else 1
            times[index] += added
            total += added
            if total >= train_appearances:
                break
        first = False
    return times


def with_regularization(examples: Examples, reg: Examples | None, cfg: TrainConfig) -> Examples:
    """The training examples and, after them, the regularization images an epoch uses, with
    their appearances (kohya's ratio) and captions (``reg_caption`` when set)."""
    if reg is None:
        return examples
    if reg.resolution != examples.resolution:
        raise LoramillError(
            f"train.reg_data: its images are resized for resolution {reg.resolution}, this "
            f"dataset's for {examples.resolution}; give both the same resize.resolution"
        )
    times = reg_times(sum(examples.times(cfg.repeats)), reg.repeats)
    captions = [cfg.reg_caption] * len(reg.captions) if cfg.reg_caption else reg.captions
    marked = replace(reg, repeats=times, captions=captions, reg=[True] * len(times))
    used = subset(marked, [n > 0 for n in times])
    log.info("regularization: %d of %d images, %d appearances per epoch beside as many of "
             "training images (prior_loss_weight %g)", len(used.images), len(times),
             sum(times), cfg.prior_loss_weight)  # fmt: skip
    joined = {f.name: getattr(examples, f.name) + getattr(used, f.name)
              for f in fields(examples) if f.name != "resolution"}  # fmt: skip
    return Examples(**joined, resolution=examples.resolution)
