"""Masked loss (issue #32): masks are cropped and resized exactly as their images, the loss
is the hand-computed weighted loss, and what a mask weighs 0 teaches nothing."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import TRAIN_CONFIG
from PIL import Image, ImageOps

from loramill.captions.merge import merge_captions
from loramill.files import write_jsonl
from loramill.models.checkpoint import read_checkpoint
from loramill.prepare.resize import resize_dataset
from loramill.train.masks import batch_masks
from loramill.train.objective import loss

BUCKETS = {"resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 16}


def pattern(size: tuple[int, int], seed: int) -> Image.Image:
    """A greyscale picture with structure everywhere, so a shifted crop would show."""
    rnd = np.random.default_rng(seed)
    return Image.fromarray(rnd.integers(0, 256, (size[1], size[0]), dtype=np.uint8))


def resize(root, caplog):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loramill"):
        manifest = resize_dataset(root / "images", root / "out", BUCKETS, cache_dir=root / "c")
    return manifest, [r.getMessage() for r in caplog.records]


def test_a_mask_is_cropped_and_resized_exactly_as_its_image(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    # the image is its mask in colour: after the stage, every pixel must still agree
    for name, size in (("wide", (96, 48)), ("tall", (40, 88))):
        mask = pattern(size, len(name))
        mask.convert("RGB").save(tmp_path / "images" / f"{name}.png")
        mask.save(tmp_path / "masks" / f"{name}.png")
    rgba = pattern((64, 80), 3).convert("RGB").convert("RGBA")
    alpha = pattern((64, 80), 4)
    rgba.putalpha(alpha)
    rgba.save(tmp_path / "images" / "clear.png")
    pattern((30, 30), 5).save(tmp_path / "masks" / "nobody.png")
    manifest, lines = resize(tmp_path, caplog)
    masks = {entry["file"]: entry["mask"] for entry in manifest["images"]}
    assert masks == {"wide.png": "masks/wide.png", "tall.png": "masks/tall.png",
                     "clear.png": "alpha"}  # fmt: skip
    assert "masks: 2 from masks/, 1 from transparency" in lines
    assert any("masks: 1 file(s) no image is named as: " in line for line in lines)
    out = tmp_path / "out"
    for name in ("wide", "tall"):
        image = np.asarray(Image.open(out / f"{name}.png").convert("L"), dtype=int)
        mask = np.asarray(Image.open(out / "masks" / f"{name}.png"), dtype=int)
        assert image.shape == mask.shape
        assert np.abs(image - mask).max() <= 1  # the same pixels: nothing moved
    entry = next(e for e in manifest["images"] if e["file"] == "clear.png")
    bucket = tuple(entry["bucket"])
    expected = ImageOps.fit(alpha, bucket, method=Image.Resampling.LANCZOS)  # the image's crop
    assert np.array_equal(np.asarray(Image.open(out / "masks" / "clear.png")), np.asarray(expected))


def test_a_mask_of_another_size_than_its_image_is_quarantined(tmp_path, caplog):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    pattern((64, 64), 0).save(tmp_path / "images" / "a.png")
    pattern((64, 64), 1).save(tmp_path / "images" / "b.png")
    pattern((32, 32), 2).save(tmp_path / "masks" / "a.png")
    manifest, _ = resize(tmp_path, caplog)
    assert [e["file"] for e in manifest["images"]] == ["b.png"]
    assert manifest["quarantined"] == [{
        "source": "images/a.png",
        "reason": "its mask masks/a.png is 32×32 px and the image 64×64: a mask must be its "
        "image's size",
    }]  # fmt: skip


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_the_masked_loss_is_the_hand_computed_weighted_loss(loss_type):
    generator = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 4, 4, generator=generator), torch.randn(2, 4, 4, 4)
    mask = torch.rand(2, 1, 4, 4, generator=generator)
    weight = torch.tensor([0.5, 2.0])
    cfg = SimpleNamespace(loss_type=loss_type, huber_c=0.1)
    if loss_type == "l2":
        error = (pred - target) ** 2
    else:
        error = torch.nn.functional.huber_loss(pred, target, reduction="none", delta=0.1)
    per_image = (error * mask).sum(dim=(1, 2, 3)) / (4 * 4 * 4)  # zeros count, as kohya's
    torch.testing.assert_close(loss(pred, target, None, cfg, mask), per_image.mean())
    expected = (per_image * weight).mean()
    torch.testing.assert_close(loss(pred, target, weight, cfg, mask), expected)
    torch.testing.assert_close(
        loss(pred, target, None, cfg, torch.ones(2, 1, 4, 4)), loss(pred, target, None, cfg)
    )


def test_a_batchs_masks_are_mirrored_with_their_images_and_averaged_to_latent_size(tmp_path):
    left = np.zeros((16, 32), dtype=np.uint8)
    left[:, :8] = 255  # the left quarter
    Image.fromarray(left).save(tmp_path / "m.png")
    masks = batch_masks([tmp_path / "m.png", tmp_path / "m.png", None], [False, True, False],
                        (2, 4))  # fmt: skip
    assert masks.shape == (3, 1, 2, 4)
    assert masks[0, 0].tolist() == [[1, 0, 0, 0]] * 2
    assert masks[1, 0].tolist() == [[0, 0, 0, 1]] * 2  # mirrored
    assert masks[2, 0].tolist() == [[1, 1, 1, 1]] * 2  # no mask: full weight
    assert batch_masks([None, None], [False, False], (2, 2)) is None


def test_what_a_mask_weighs_zero_teaches_nothing(tiny_sd, tmp_path, caplog):
    """Every image masked black: the loss is 0, no gradient flows, and the up matrices stay
    at their start (zero); with the masks off, the same run trains them."""
    from loramill.demo.images import generate_dataset
    from loramill.prepare.pixels import displayed_size, open_image
    from loramill.train.loop import train_lora

    generate_dataset(tmp_path / "ds", "stripes", 4)
    images, masks = tmp_path / "ds" / "images", tmp_path / "ds" / "masks"
    masks.mkdir()
    for path in sorted(images.iterdir()):  # every image masked, at its displayed size
        with open_image(path) as image:
            Image.new("L", displayed_size(image), 0).save(masks / f"{path.stem}.png")
    manifest = resize_dataset(images, tmp_path / "resized", BUCKETS, cache_dir=tmp_path / "c")
    auto = [{"image": e["file"], "caption": e["file"][:-4]} for e in manifest["images"]]
    write_jsonl(tmp_path / "auto.jsonl", auto)
    captions = tmp_path / "captions.jsonl"
    merge_captions(tmp_path / "auto.jsonl", None, captions, tmp_path / "r.json", "")
    config = {**TRAIN_CONFIG, "max_train_steps": 2, "save_steps": 2, "train_batch_size": 2}

    def trained(out, **options):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="loramill"):
            written = train_lora(
                tmp_path / "resized", tmp_path / "captions.jsonl", out / "checkpoints",
                out / "tb", tiny_sd, {**config, **options},
            )  # fmt: skip
        lines = [r.getMessage() for r in caplog.records]
        return read_checkpoint(written[-1]).tensors, lines

    still, lines = trained(tmp_path / "masked", masked_loss=True)
    assert "masked_loss: 4 images masked (4 by masks/ files, 0 by transparency), 0 without " \
        "a mask weigh 1 everywhere" in lines  # fmt: skip
    ups = [key for key in still if ".lora_B." in key]
    assert ups and all(not still[key].any() for key in ups)
    moved, _ = trained(tmp_path / "plain")
    assert any(moved[key].any() for key in ups)
