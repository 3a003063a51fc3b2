"""Aspect-ratio buckets against cases computed by hand from the documented algorithm."""

from __future__ import annotations

import pytest
import torch

from loramill import LoramillError
from loramill.prepare.buckets import (
    BucketSpec,
    batches,
    batches_per_epoch,
    bucket_for,
    bucket_sizes,
    nearest,
)

SD15 = BucketSpec(512)  # kohya's defaults: 256–1024, steps of 64


def test_sd15_buckets():
    # width w → height min(1024, 512² // w) rounded down to 64, and the transpose:
    # 256→1024, 320→768 (819), 384→640 (682), 448→576 (585), 512→512, 576→448 (455),
    # 640→384 (409), 704→320 (372), 768→320 (341), 832..960→256 (315..273), 1024→256.
    assert bucket_sizes(SD15) == [
        (256, 832), (256, 896), (256, 960), (256, 1024),
        (320, 704), (320, 768), (384, 640), (448, 576), (512, 512),
        (576, 448), (640, 384), (704, 320), (768, 320),
        (832, 256), (896, 256), (960, 256), (1024, 256),
    ]  # fmt: skip
    assert all(w * h <= 512 * 512 and w % 64 == h % 64 == 0 for w, h in bucket_sizes(SD15))


def test_resolution_off_the_step_and_narrow_range():
    # 520 px: the square is 512; 448–576: 448→576 (603), 512→512 (528), 576→448 (469).
    spec = BucketSpec(520, min_bucket_reso=448, max_bucket_reso=576)
    assert bucket_sizes(spec) == [(448, 576), (512, 512), (576, 448)]


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        # 3:2 (log 0.405): 640×384 is 0.105 away, 576×448 0.154
        ((3000, 2000), (640, 384)),
        # 9:16 (log -0.575): 384×640 is 0.064 away, 320×704 0.213
        ((1080, 1920), (384, 640)),
        ((1000, 1000), (512, 512)),
        # 4:1 and wider: the widest bucket
        ((4000, 1000), (1024, 256)),
        ((8000, 100), (1024, 256)),
        # 16:9 (log 0.575): 704×320 is 0.214 away, 640×384 0.065
        ((1920, 1080), (640, 384)),
    ],
)
def test_nearest_aspect_ratio(size, bucket):
    assert bucket_for(size, SD15, bucket_sizes(SD15)) == bucket


def test_tie_goes_to_the_larger_bucket():
    # 2:1 is log 2 away from both 1:1 and 4:1
    assert nearest((200, 100), [(64, 64), (256, 64)]) == (256, 64)
    assert nearest((200, 100), [(256, 64), (64, 64)]) == (256, 64)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [
        ((300, 200), (256, 192)),  # under 512²: its own size, down to the step
        # 12 MP: scaled by 512 / √(4000·3000) = 0.1478 to 591×443, down to 576×384
        ((4000, 3000), (576, 384)),
        ((512, 512), (512, 512)),
    ],
)
def test_no_upscale(size, bucket):
    spec = BucketSpec(512, bucket_no_upscale=True)
    assert bucket_for(size, spec, bucket_sizes(spec)) == bucket


def test_without_buckets_one_square():
    spec = BucketSpec(512, enable_bucket=False)
    assert bucket_for((3000, 2000), spec, bucket_sizes(spec)) == (512, 512)


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"min_bucket_reso": 576}, "resize.resolution \\(512\\) is outside"),
        ({"max_bucket_reso": 1000}, "resize.max_bucket_reso \\(1000\\) is not a multiple"),
        ({"min_bucket_reso": 200}, "resize.min_bucket_reso \\(200\\) is not a multiple"),
    ],
)
def test_contradicting_options_name_the_key(options, key):
    with pytest.raises(LoramillError, match=key):
        BucketSpec.from_settings({"resolution": 512, **options})


def test_batches_come_from_one_bucket_and_follow_the_seed():
    sizes = [(64, 32), (32, 64), (64, 32), (32, 64), (64, 32), (48, 48), (64, 32)]
    epoch = batches(sizes, 2, torch.Generator().manual_seed(0))
    assert sorted(i for batch in epoch for i in batch) == list(range(len(sizes)))
    assert all(len({sizes[i] for i in batch}) == 1 for batch in epoch)
    assert sorted(len(b) for b in epoch) == [1, 2, 2, 2]  # 4 + 2 + 1 images
    assert epoch == batches(sizes, 2, torch.Generator().manual_seed(0))
    others = [batches(sizes, 2, torch.Generator().manual_seed(s)) for s in range(1, 6)]
    assert any(other != epoch for other in others)


def test_repeats_put_each_image_in_the_epoch_that_many_times():
    sizes = [(64, 32), (64, 32), (32, 64)]
    epoch = batches(sizes, 2, torch.Generator().manual_seed(0), repeats=3)
    flat = sorted(i for batch in epoch for i in batch)
    assert flat == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(len({sizes[i] for i in batch}) == 1 for batch in epoch)


def test_batches_per_epoch_counts_what_batches_makes():
    sizes = [(64, 32)] * 3 + [(32, 64)] * 2 + [(48, 48)]
    # per bucket ⌈n·repeats / batch⌉: 2 + 1 + 1, and with 2 repeats 3 + 2 + 1
    assert batches_per_epoch(sizes, 2) == 4
    assert batches_per_epoch(sizes, 2, repeats=2) == 6
    for repeats in (1, 2):
        epoch = batches(sizes, 2, torch.Generator().manual_seed(0), repeats)
        assert len(epoch) == batches_per_epoch(sizes, 2, repeats)
