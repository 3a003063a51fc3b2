"""Resize stage: buckets, orientation, colour, quarantine of every kind of unusable file, names,
links into DVC's cache, and the per-image cache."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import random
import struct
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageOps

from loramill import LoramillError
from loramill.demo.images import EXIF_ORIENTATION, draw_picture, generate_dataset
from loramill.hashing import HashCache, hash_value
from loramill.prepare import resize as resize_module
from loramill.prepare.resize import SUBFOLDER, resize_dataset
from loramill.prepare.same_pixels import SAME_PIXELS
from loramill.reruns.fingerprints import stage_code

SQUARE = {"resolution": 16, "enable_bucket": False}
BUCKETS = {"resolution": 32, "min_bucket_reso": 16, "max_bucket_reso": 64, "bucket_reso_steps": 16}


def make(path, size=(40, 20), colour=(255, 0, 0), mode="RGB", **save):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path, **save)
    return path


def resize(tmp_path, settings=SQUARE, **kwargs):
    kwargs.setdefault("cache_dir", tmp_path / "cache")
    return resize_dataset(tmp_path / "ds" / "images", tmp_path / "out", settings, **kwargs)


def pixel(tmp_path, name, xy=(4, 4)):
    with Image.open(tmp_path / "out" / name) as out:
        return out.getpixel(xy)


def test_every_format_becomes_an_rgb_png_of_its_bucket(tmp_path):
    generate_dataset(tmp_path / "ds", "circles", 10)
    manifest = resize(tmp_path, BUCKETS)
    assert len(manifest["images"]) == 10 and manifest["quarantined"] == []
    for entry in manifest["images"]:
        width, height = entry["bucket"]
        assert width * height <= 32 * 32 and width % 16 == height % 16 == 0
        with Image.open(tmp_path / "out" / entry["file"]) as image:
            assert (image.format, image.mode, image.size) == ("PNG", "RGB", (width, height))
        # the bucket nearest the picture's aspect ratio: wide stays wide, tall stays tall
        w, h = entry["original_size"]
        assert (w > h) == (width > height) or w == h or width == height
    assert len({tuple(e["bucket"]) for e in manifest["images"]}) > 1
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == manifest


def test_without_buckets_every_image_is_a_centre_square(tmp_path):
    image = Image.new("RGB", (60, 20), (0, 255, 0))
    image.paste((255, 0, 0), (20, 0, 40, 20))  # red middle third
    (tmp_path / "ds" / "images").mkdir(parents=True)
    image.save(tmp_path / "ds" / "images" / "wide.png")
    manifest = resize(tmp_path, {"resolution": 8, "enable_bucket": False})
    assert manifest["images"][0]["bucket"] == [8, 8]
    with Image.open(tmp_path / "out" / "wide.png") as out:
        assert all(out.getpixel((x, 4))[0] > 200 for x in range(1, 7))


def test_exif_rotation_is_applied(tmp_path):
    # A landscape picture stored portrait, with EXIF saying "rotate 90° to display".
    image = Image.new("RGB", (20, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # red on the top half as stored
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    (tmp_path / "ds" / "images").mkdir(parents=True)
    image.save(tmp_path / "ds" / "images" / "photo.jpg", exif=exif, quality=95)
    manifest = resize(tmp_path, BUCKETS)
    assert manifest["images"][0]["original_size"] == [40, 20]
    assert manifest["images"][0]["bucket"] == [48, 16]  # upright: landscape
    # rotated 90° clockwise: the stored top half is now on the right
    right, left = pixel(tmp_path, "photo.png", (44, 8)), pixel(tmp_path, "photo.png", (3, 8))
    assert right[0] > 200 and right[2] < 60
    assert left[2] > 200 and left[0] < 60


@pytest.mark.parametrize(
    ("mode", "colour", "background", "expected"),
    [
        ("RGBA", (0, 0, 0, 0), "white", (255, 255, 255)),
        ("RGBA", (0, 0, 0, 0), "#102030", (16, 32, 48)),
        ("LA", (0, 0), "black", (0, 0, 0)),
        ("LA", (0, 0), "white", (255, 255, 255)),
        ("RGBA", (255, 0, 0, 255), "black", (255, 0, 0)),
    ],
)
def test_transparency_is_flattened_on_the_background(tmp_path, mode, colour, background, expected):
    make(tmp_path / "ds" / "images" / "clear.png", (16, 16), colour, mode=mode)
    resize(tmp_path, {**SQUARE, "background": background})
    assert pixel(tmp_path, "clear.png") == expected


def test_palette_transparency_is_flattened(tmp_path):
    image = Image.new("P", (16, 16), 0)
    image.putpalette([200, 0, 0, 0, 0, 255] + [0] * 762)
    image.paste(1, (0, 0, 8, 16))  # left half colour 1, marked transparent
    (tmp_path / "ds" / "images").mkdir(parents=True)
    image.save(tmp_path / "ds" / "images" / "p.png", transparency=1)
    resize(tmp_path, {"resolution": 16, "enable_bucket": False, "background": "white"})
    assert pixel(tmp_path, "p.png", (2, 8)) == (255, 255, 255)
    assert pixel(tmp_path, "p.png", (13, 8)) == (200, 0, 0)


def test_cmyk_and_16_bit_greyscale_keep_their_tones(tmp_path):
    make(tmp_path / "ds" / "images" / "cmyk.jpg", (16, 16), (0, 255, 255, 0), mode="CMYK")
    grey = Image.new("I;16", (16, 16), 32768)  # mid-grey in 16 bits
    grey.save(tmp_path / "ds" / "images" / "deep.png")
    resize(tmp_path)
    red = pixel(tmp_path, "cmyk.png")
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    assert all(120 <= v <= 136 for v in pixel(tmp_path, "deep.png"))


def swapped_primaries_profile() -> bytes:
    """A linear RGB ICC profile whose red and blue primaries are sRGB's blue and red: an image
    tagged with it must come out with red and blue exchanged."""
    d50 = (0.9642, 1.0, 0.8249)
    red, green, blue = (0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141)

    def xyz(values):
        return b"XYZ \0\0\0\0" + b"".join(struct.pack(">i", round(v * 65536)) for v in values)

    linear = b"curv\0\0\0\0" + struct.pack(">I", 0)
    tags = {b"rXYZ": xyz(blue), b"gXYZ": xyz(green), b"bXYZ": xyz(red), b"wtpt": xyz(d50)}
    tags |= {b"rTRC": linear, b"gTRC": linear, b"bTRC": linear}
    offset, table, data = 128 + 4 + 12 * len(tags), b"", b""
    for signature, body in tags.items():
        body += b"\0" * (-len(body) % 4)
        table += signature + struct.pack(">II", offset + len(data), len(body))
        data += body
    size = offset + len(data)
    header = struct.pack(">I4sI4s4s4s", size, b"", 0x02100000, b"mntr", b"RGB ", b"XYZ ")
    header += b"\0" * 12 + b"acsp" + b"\0" * 24 + xyz(d50)[8:]
    header += b"\0" * (128 - len(header))
    return header + struct.pack(">I", len(tags)) + table + data


def test_an_embedded_icc_profile_is_converted_to_srgb(tmp_path):
    profile = swapped_primaries_profile()
    ImageCms.ImageCmsProfile(io.BytesIO(profile))  # a profile littlecms accepts
    make(tmp_path / "ds" / "images" / "tagged.png", (16, 16), (255, 0, 0), icc_profile=profile)
    make(tmp_path / "ds" / "images" / "plain.png", (16, 16), (255, 0, 0))
    resize(tmp_path)
    tagged, plain = pixel(tmp_path, "tagged.png"), pixel(tmp_path, "plain.png")
    assert tagged[2] > 200 and tagged[0] < 60, tagged
    assert plain == (255, 0, 0)


def test_every_bad_file_is_quarantined_with_a_reason_and_left_alone(tmp_path, caplog):
    images = tmp_path / "ds" / "images"
    make(images / "good.png", (32, 32))
    make(images / "good_2.png", (32, 32))  # byte-identical: the later name goes
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    (images / "empty.png").write_bytes(b"")
    full = make(tmp_path / "full.jpg", (64, 64), (0, 200, 0)).read_bytes()
    (images / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (images / "notes.txt").write_text("not an image")
    (images / "fake.png").write_text("a text file named like an image")
    (images / "sub").mkdir()
    make(images / "dot.png", (1, 1))
    os.symlink(make(tmp_path / "secret.png", (32, 32), (9, 9, 9)), images / "escape.png")
    before = {p.name: p.read_bytes() for p in images.iterdir() if p.is_file()}

    with caplog.at_level(logging.WARNING, logger="loramill"):
        manifest = resize(tmp_path, quarantine_csv=tmp_path / "quarantine.csv")

    assert [e["file"] for e in manifest["images"]] == ["good.png"]
    reasons = {q["source"]: q["reason"] for q in manifest["quarantined"]}
    assert reasons == {
        "images/broken.jpg": "corrupt image: Truncated File Read",
        "images/good_2.png": "duplicate of images/good.png (identical bytes)",
        "images/dot.png": "too small: 1×1 px (resize.min_side is 8)",
        "images/empty.png": "empty file (0 bytes)",
        "images/fake.png": "not a readable image (unknown or corrupt format)",
        "images/escape.png": f"link escapes the dataset (to {tmp_path / 'secret.png'})",
        "images/notes.txt": "unsupported type '.txt'",
        "images/sub": SUBFOLDER,
        "images/truncated.jpg": reasons["images/truncated.jpg"],
    }
    assert reasons["images/truncated.jpg"].startswith("corrupt image: ")
    with open(tmp_path / "quarantine.csv", newline="") as handle:
        rows = list(csv.reader(handle))
    assert rows == [["file", "reason"], *map(list, sorted(reasons.items()))]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("quarantined 9 file(s): ")
    assert {p.name: p.read_bytes() for p in images.iterdir() if p.is_file()} == before
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["good.png", "manifest.json"]


def test_decompression_bomb_is_quarantined(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    make(tmp_path / "ds" / "images" / "small.png", (8, 8))
    make(tmp_path / "ds" / "images" / "huge.png", (64, 64))
    manifest = resize(tmp_path, {"resolution": 8, "enable_bucket": False})
    assert [e["file"] for e in manifest["images"]] == ["small.png"]
    assert "decompression-bomb" in manifest["quarantined"][0]["reason"]


def test_names_differing_only_in_case_or_extension_are_reported(tmp_path):
    make(tmp_path / "ds" / "images" / "cat.jpg", (16, 16), (1, 2, 3))
    make(tmp_path / "ds" / "images" / "Cat.png", (16, 16), (4, 5, 6))
    manifest = resize(tmp_path)
    assert [e["source"] for e in manifest["images"]] == ["images/Cat.png"]
    assert manifest["quarantined"] == [
        {
            "source": "images/cat.jpg",
            "reason": "same name as images/Cat.png apart from case or extension "
            "(outputs and captions are matched by name): rename one",
        }
    ]


def test_unicode_and_spaces_in_names(tmp_path):
    decomposed = unicodedata.normalize("NFD", "café au lait")
    make(tmp_path / "ds" / "images" / f"{decomposed}.jpg", (16, 16))
    manifest = resize(tmp_path)
    assert manifest["images"][0]["file"] == unicodedata.normalize("NFC", "café au lait.png")
    assert (tmp_path / "out" / manifest["images"][0]["file"]).is_file()


def test_links_into_the_dvc_cache_are_read(tmp_path, monkeypatch):
    """What `dvc checkout` makes with cache.type symlink; also with the cache moved away."""
    project = tmp_path / "project"
    cached = make(project / ".dvc/cache/files/md5/ab/cdef", (16, 16), format="PNG")
    elsewhere = make(
        tmp_path / "big-disk/cache/files/md5/12/3456", (16, 16), (0, 9, 0), format="PNG"
    )
    (project / ".dvc" / "config").write_text("[cache]\n    dir = ../../big-disk/cache\n")
    images = project / "ds" / "images"
    images.mkdir(parents=True)
    os.symlink(cached, images / "a.png")
    os.symlink(elsewhere, images / "b.png")
    monkeypatch.chdir(project)
    manifest = resize_dataset(images, tmp_path / "out", SQUARE, cache_dir=tmp_path / "cache")
    assert [e["file"] for e in manifest["images"]] == ["a.png", "b.png"]


def test_adding_one_image_processes_one(tmp_path, caplog):
    generate_dataset(tmp_path / "ds", "stripes", 6)
    first = sorted((tmp_path / "ds" / "images").iterdir())[0]
    hidden = first.rename(tmp_path / first.name)  # the one added later
    with caplog.at_level(logging.INFO, logger="loramill"):
        resize(tmp_path, BUCKETS, name="stripes", threads=2)
        hidden.rename(first)
        resize(tmp_path, BUCKETS, name="stripes", threads=2)
        resize(tmp_path, {**BUCKETS, "background": "black"}, name="stripes")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resize ")]
    assert lines == [
        "resize stripes: 5 new, 0 reused, 0 quarantined",
        "resize stripes: 1 new, 5 reused, 0 quarantined",
        "resize stripes: 6 new, 0 reused, 0 quarantined",  # other settings: nothing reused
    ]


def written(out: Path) -> dict[Path, bytes]:
    """Every file the stage wrote, masks/ included, by its path in ``out``."""
    return {path.relative_to(out): path.read_bytes() for path in out.rglob("*") if path.is_file()}


def test_images_cached_by_older_code_that_makes_the_same_pixels_are_reused(
    tmp_path, caplog, monkeypatch
):
    generate_dataset(tmp_path / "ds", "stripes", 4)
    with caplog.at_level(logging.INFO, logger="loramill"):
        resize(tmp_path, BUCKETS, name="stripes", code="older")
        made = written(tmp_path / "out")
        resize(tmp_path, BUCKETS, name="stripes", code="newer")  # code changed: redone
        monkeypatch.setattr(resize_module, "SAME_PIXELS", {"latest": ("other", "older")})
        resize(tmp_path, BUCKETS, name="stripes", code="latest")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("resize ")]
    assert lines == [
        "resize stripes: 4 new, 0 reused, 0 quarantined",
        "resize stripes: 4 new, 0 reused, 0 quarantined",
        "resize stripes: 0 new, 4 reused, 0 quarantined",
    ]
    assert written(tmp_path / "out") == made


def test_same_pixels_names_only_the_resize_code_of_today(tmp_path):
    """An entry keyed by code the stage no longer has is dead: remove it when resize changes."""
    code = stage_code(Path("scripts/resize.py"), HashCache(tmp_path / "hashes.sqlite"))
    assert set(SAME_PIXELS) <= {hash_value(code.parts)}


def test_threads_and_the_cache_give_the_same_bytes(tmp_path):
    generate_dataset(tmp_path / "ds", "bands", 6)
    outputs = []
    for threads, cache in ((1, "one"), (2, "two"), (2, "two")):  # the last one reuses
        resize(tmp_path, BUCKETS, threads=threads, cache_dir=tmp_path / cache)
        outputs.append(written(tmp_path / "out"))
    assert outputs[0] == outputs[1] == outputs[2]
    assert any(path.parts[0] == "masks" for path in outputs[0])  # transparency's masks too


def test_jpeg_draft_decoding_matches_a_full_decode(tmp_path):
    """Draft mode (DCT scaling) then Lanczos, against Lanczos from the full image."""
    picture = draw_picture("circles", "red", "white", (1600, 1200), random.Random(0))
    picture.save(make(tmp_path / "ds" / "images" / "big.jpg"), quality=95)
    resize(tmp_path, {"resolution": 64, "enable_bucket": False})
    with Image.open(tmp_path / "ds" / "images" / "big.jpg") as full:
        reference = ImageOps.fit(full.convert("RGB"), (64, 64), Image.Resampling.LANCZOS)
    with Image.open(tmp_path / "out" / "big.png") as out:
        difference = np.abs(np.asarray(out, dtype=int) - np.asarray(reference, dtype=int))
    assert difference.mean() < 2


def test_bucket_options_are_checked_by_name(tmp_path):
    make(tmp_path / "ds" / "images" / "a.png", (16, 16))
    with pytest.raises(LoramillError, match=r"resize.min_bucket_reso \(256\)"):
        resize(tmp_path, {"resolution": 64})


def test_no_usable_image_is_an_error(tmp_path):
    (tmp_path / "ds" / "images").mkdir(parents=True)
    (tmp_path / "ds" / "images" / "x.png").write_bytes(b"nope")
    with pytest.raises(LoramillError, match="no usable images"):
        resize(tmp_path)


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(LoramillError, match="image folder does not exist"):
        resize_dataset(tmp_path / "nope", tmp_path / "out", SQUARE, cache_dir=tmp_path / "c")
