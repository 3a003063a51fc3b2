"""Resize stage: orientation, colour, cropping, quarantine of unusable files."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from loramill import LoramillError
from loramill.demo_data import EXIF_ORIENTATION, generate_dataset
from loramill.resize import resize_dataset


def make(path, size=(40, 20), colour=(255, 0, 0), mode="RGB", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def test_every_format_becomes_square_rgb_png(tmp_path):
    generate_dataset(tmp_path / "ds", "circles", 10)
    manifest = resize_dataset(tmp_path / "ds" / "images", tmp_path / "out", 32)
    assert len(manifest["images"]) == 10 and manifest["quarantined"] == []
    for entry in manifest["images"]:
        with Image.open(tmp_path / "out" / entry["file"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (32, 32))
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_exif_rotation_is_applied(tmp_path):
    # A landscape picture stored portrait, with EXIF saying "rotate 90° to display".
    image = Image.new("RGB", (20, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # red on the top half as stored
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    (tmp_path / "ds" / "images").mkdir(parents=True)
    image.save(tmp_path / "ds" / "images" / "photo.jpg", exif=exif, quality=95)
    manifest = resize_dataset(tmp_path / "ds" / "images", tmp_path / "out", 16)
    assert manifest["images"][0]["original_size"] == [40, 20]
    with Image.open(tmp_path / "out" / "photo.png") as out:
        # rotated 90° clockwise: the stored top half is now on the right
        right, left = out.getpixel((14, 8)), out.getpixel((1, 8))
    assert right[0] > 200 and right[2] < 60
    assert left[2] > 200 and left[0] < 60


def test_transparency_is_flattened_on_white(tmp_path):
    make(tmp_path / "ds" / "images" / "clear.png", (16, 16), (0, 0, 0, 0), mode="RGBA")
    resize_dataset(tmp_path / "ds" / "images", tmp_path / "out", 8)
    with Image.open(tmp_path / "out" / "clear.png") as out:
        assert out.getpixel((4, 4)) == (255, 255, 255)


def test_center_crop_keeps_the_middle(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 255, 0))
    image.paste((255, 0, 0), (20, 0, 40, 20))  # red middle third
    (tmp_path / "ds" / "images").mkdir(parents=True)
    image.save(tmp_path / "ds" / "images" / "wide.png")
    resize_dataset(tmp_path / "ds" / "images", tmp_path / "out", 8)
    with Image.open(tmp_path / "out" / "wide.png") as out:
        assert all(out.getpixel((x, 4))[0] > 200 for x in range(1, 7))


def test_bad_files_are_quarantined_with_a_reason_and_left_alone(tmp_path):
    images = tmp_path / "ds" / "images"
    make(images / "good.png")
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    truncated = make(tmp_path / "full.png", (64, 64)).read_bytes()[:60]
    (images / "truncated.png").write_bytes(truncated)
    (images / "notes.txt").write_text("not an image")
    outside = make(tmp_path / "secret.png")
    os.symlink(outside, images / "escape.png")
    before = {p.name: p.read_bytes() for p in images.iterdir()}

    manifest = resize_dataset(images, tmp_path / "out", 8)

    assert [e["file"] for e in manifest["images"]] == ["good.png"]
    reasons = {q["source"]: q["reason"] for q in manifest["quarantined"]}
    assert set(reasons) == {
        "images/broken.jpg",
        "images/truncated.png",
        "images/notes.txt",
        "images/escape.png",
    }
    assert "escapes" in reasons["images/escape.png"]
    assert "unsupported" in reasons["images/notes.txt"]
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png", "manifest.json"]


def test_decompression_bomb_is_quarantined(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    make(tmp_path / "ds" / "images" / "small.png", (8, 8))
    make(tmp_path / "ds" / "images" / "huge.png", (64, 64))
    manifest = resize_dataset(tmp_path / "ds" / "images", tmp_path / "out", 8)
    assert [e["file"] for e in manifest["images"]] == ["small.png"]
    assert "decompression-bomb" in manifest["quarantined"][0]["reason"]


def test_duplicate_names_are_an_error_naming_both(tmp_path):
    make(tmp_path / "ds" / "images" / "cat.png")
    make(tmp_path / "ds" / "images" / "cat.jpg")
    with pytest.raises(LoramillError, match=r"cat\.jpg and .*cat\.png"):
        resize_dataset(tmp_path / "ds" / "images", tmp_path / "out", 8)


def test_no_usable_image_is_an_error(tmp_path):
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "images" / "x.png").write_bytes(b"nope")
    with pytest.raises(LoramillError, match="no usable images"):
        resize_dataset(tmp_path / "ds" / "images", tmp_path / "out", 8)
