"""Regularization images (issue #32): kohya's ratio, batches that mix both, the prior loss
weight, and a regularization set shared by two datasets encoded once."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
import torch
from conftest import TRAIN_CONFIG, prepare_set

from loramill import LoramillError
from loramill.models.checkpoint import read_checkpoint
from loramill.prepare.buckets import batches
from loramill.train.config import TrainConfig
from loramill.train.data import read_examples
from loramill.train.regularization import reg_times, with_regularization

REG = {"max_train_steps": 4, "save_steps": 4}


def test_regularization_images_appear_as_often_as_training_images_as_kohya_counts():
    # repeats in order until the training appearances are reached ...
    assert reg_times(3, [1, 1, 1, 1, 1]) == [1, 1, 1, 0, 0]
    assert reg_times(3, [10, 1]) == [10, 0]  # a folder's repeats are taken whole, as kohya's
    # ... then one more each, round after round
    assert reg_times(10, [1, 1, 1, 1]) == [3, 3, 2, 2]
    assert reg_times(7, [2, 1]) == [4, 3]
    assert reg_times(5, []) == []


def make_set(root, style, count, seed=0):
    """A folder laid out as a dataset, resized and captioned as the stages would."""
    prepare_set(root, style, count, seed)
    return root


@pytest.fixture(scope="module")
def reg_set(tmp_path_factory):
    return make_set(tmp_path_factory.mktemp("reg"), "circles", 7, seed=1)


def test_an_epochs_batches_mix_training_and_regularization_images_one_for_one(prepared, reg_set):
    cfg = TrainConfig.from_dict({**TRAIN_CONFIG, "repeats": 2})
    train = read_examples(prepared / "resized", prepared / "captions.jsonl")
    joined = with_regularization(
        train, read_examples(reg_set / "resized", reg_set / "captions.jsonl"), cfg
    )
    times = joined.times(cfg.repeats)
    assert sum(times[:5]) == 10  # five training images, twice each
    assert times[5:] == [2, 2, 2, 1, 1, 1, 1]  # kohya's ratio: 7 regularization images, 10 in all
    epoch = batches(joined.buckets, 2, torch.Generator().manual_seed(0), times)
    seen = Counter(joined.reg[i] for batch in epoch for i in batch)
    assert seen == {False: 10, True: 10}
    assert any(len({joined.reg[i] for i in batch}) == 2 for batch in epoch)  # mixed batches


def test_each_regularization_images_loss_is_weighed_by_the_prior_loss_weight(
    prepared, reg_set, tiny_sd, tmp_path, monkeypatch
):
    """Every batch's per-image weights: prior_loss_weight for its regularization images, 1
    for the dataset's (each image's loss times its weight: test_masked_loss's loss by hand)."""
    from loramill.train.loop import train_lora
    from loramill.train.objective import NoisePrediction
    from loramill.train.step import Training

    batches_seen, weights_seen = [], []
    next_batch, loss = Training._next_batch, NoisePrediction.loss

    def recording_next_batch(self):
        batches_seen.append(next_batch(self))
        return batches_seen[-1]

    def recording_loss(self, pred, target, level, mask=None, weight=None):
        weights_seen.append(None if weight is None else weight.tolist())
        return loss(self, pred, target, level, mask, weight)

    monkeypatch.setattr(Training, "_next_batch", recording_next_batch)
    monkeypatch.setattr(NoisePrediction, "loss", recording_loss)
    config = {**TRAIN_CONFIG, **REG, "prior_loss_weight": 0.25}
    written = train_lora(
        prepared / "resized", prepared / "captions.jsonl", tmp_path / "c", tmp_path / "tb",
        tiny_sd, config, reg_resized_dir=reg_set / "resized",
        reg_captions_jsonl=reg_set / "captions.jsonl",
    )  # fmt: skip
    # the dataset's 5 examples come first, then the regularization images
    expected = [[0.25 if i >= 5 else 1.0 for i in batch] for batch in batches_seen]
    assert weights_seen == expected and len(expected) == 4
    assert any(0.25 in row for row in expected) and any(1.0 in row for row in expected)
    provenance = json.loads(read_checkpoint(written[-1]).metadata["loramill.provenance"])
    assert provenance["num_images"] == 5 and provenance["num_reg_images"] == 5


def test_a_regularization_set_shared_by_two_datasets_is_encoded_once(
    prepared, reg_set, tiny_sd, tmp_path, caplog
):
    """Two datasets, each with its own copy of the same regularization images resized and
    captioned: the second run encodes none of them again (the caches are content-keyed)."""
    from loramill.train.loop import train_lora

    other = make_set(tmp_path / "other", "bands", 4)
    copy = make_set(tmp_path / "copy", "circles", 7, seed=1)  # the same images, prepared again
    lines = []
    for name, dataset, reg in (("first", prepared, reg_set), ("second", other, copy)):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loramill"):
            train_lora(dataset / "resized", dataset / "captions.jsonl", tmp_path / name / "c",
                       tmp_path / name / "tb", tiny_sd, {**TRAIN_CONFIG, **REG},
                       reg_resized_dir=reg / "resized", reg_captions_jsonl=reg / "captions.jsonl",
                       cache_root=tmp_path / "cache")  # fmt: skip
        lines.append([r.getMessage() for r in caplog.records if "latents:" in r.getMessage()])
    assert lines[0] == ["latents: 10 encoded, 0 reused"]  # 5 images, 5 of the 7 reg images
    assert lines[1] == ["latents: 4 encoded, 4 reused"]  # its 4 images; 4 reg images reused


def test_regularization_options_without_images_are_refused(prepared, tiny_sd, tmp_path):
    from loramill.train.loop import train_lora

    config = {**TRAIN_CONFIG, "prior_loss_weight": 0.5}
    with pytest.raises(LoramillError, match=r"train\.prior_loss_weight: no regularization"):
        train_lora(prepared / "resized", prepared / "captions.jsonl", tmp_path / "c",
                   tmp_path / "tb", tiny_sd, config)  # fmt: skip


def test_a_prior_weight_multiplies_the_min_snr_weight():
    from loramill.train.objective import times

    snr = torch.tensor([0.5, 2.0])
    assert times(snr, torch.tensor([1.0, 0.25])).tolist() == [0.5, 0.5]
    assert times(None, torch.tensor([0.25])).tolist() == [0.25]
    assert times(snr, None) is snr and times(None, None) is None
