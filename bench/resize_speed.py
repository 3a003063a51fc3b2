"""Resize throughput on camera-sized JPEGs, and add-one incrementality (issue #9).

Generates --images 12 MP JPEGs (4000 × 3000, seeded shapes under photo-like noise, about
3–4 MB each, a third with an EXIF rotation) and measures, in the same run:

  naive     a plain PIL loop, one process: open, convert("RGB"), exif_transpose, Lanczos
            resize to cover 512 × 512, center crop, save PNG (Pillow's default level)
  loramill  loramill.prepare.resize.resize_dataset at 512 px with the default buckets, --threads
            worker processes, an empty per-image cache: draft decode, Lanczos, fast PNG

and reports images/s of each and the speedup (target ≥ 8× on 2 cores). Then, on --small
500 small JPEGs, resizes them all, adds one image and resizes again: the stage's own log
line must say exactly 1 new and 500 reused.

    .venv/bin/python bench/resize_speed.py [--images 24] [--threads 2] [--small 500]
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from loramill.demo.images import EXIF_ORIENTATION, draw_picture
from loramill.prepare.resize import resize_dataset

TARGET = 8.0
SETTINGS = {"resolution": 512}  # buckets on, kohya's defaults


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """Shapes under per-pixel noise: JPEG sizes and decode costs like a camera's."""
    rnd = random.Random(seed)
    base = draw_picture("circles", rnd.choice(["red", "blue"]), "white", size, rnd)
    noise = np.random.default_rng(seed).integers(-24, 24, (size[1], size[0], 3), dtype=np.int16)
    pixels = np.clip(np.asarray(base, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def generate(folder: Path, count: int, size: tuple[int, int], start: int = 0) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    total = 0
    for index in range(start, start + count):
        exif = Image.Exif()
        if index % 3 == 0:
            exif[EXIF_ORIENTATION] = 6
        path = folder / f"photo_{index:04d}.jpg"
        photo(size, index).save(path, quality=92, exif=exif)
        total += path.stat().st_size
    return total


def naive(images: Path, out: Path, side: int = 512) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for path in sorted(images.iterdir()):
        with Image.open(path) as opened:
            image = ImageOps.exif_transpose(opened.convert("RGB"))
        scale = side / min(image.size)
        size = (round(image.width * scale), round(image.height * scale))
        image = image.resize(size, Image.Resampling.LANCZOS)
        left, top = (size[0] - side) // 2, (size[1] - side) // 2
        image.crop((left, top, left + side, top + side)).save(out / f"{path.stem}.png")


def timed(function, *args, **kwargs) -> float:
    start = time.perf_counter()
    function(*args, **kwargs)
    return time.perf_counter() - start


def add_one(root: Path, count: int, threads: int) -> list[str]:
    images = root / "small" / "images"
    generate(images, count, (640, 480))
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("loramill.prepare.resize").addHandler(handler)
    logging.getLogger("loramill.prepare.resize").setLevel(logging.INFO)
    run = dict(settings=SETTINGS, name="small", threads=threads, cache_dir=root / "cache-small")
    resize_dataset(images, root / "small-out", **run)
    generate(images, 1, (640, 480), start=count)
    resize_dataset(images, root / "small-out", **run)
    return [line for line in lines if line.startswith("resize small")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--small", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="resize-bench-") as tmp:
        root = Path(tmp)
        images = root / "big" / "images"
        size_mb = generate(images, args.images, (4000, 3000)) / 1e6
        print(f"{args.images} JPEGs of 4000×3000, {size_mb / args.images:.1f} MB each")
        naive_s = timed(naive, images, root / "naive")
        ours_s = timed(
            resize_dataset,
            images,
            root / "ours",
            SETTINGS,
            threads=args.threads,
            cache_dir=root / "cache",
        )
        naive_rate, ours_rate = args.images / naive_s, args.images / ours_s
        speedup = ours_rate / naive_rate
        print(f"naive PIL loop  {naive_rate:6.2f} images/s ({naive_s:.1f} s)")
        print(f"loramill        {ours_rate:6.2f} images/s ({ours_s:.1f} s, {args.threads} procs)")
        print(f"speedup         {speedup:6.2f}× (target ≥ {TARGET}×)")
        lines = add_one(root, args.small, args.threads)
        print("add one to", args.small, "→", lines[-1] if lines else "no log line")
        expected = f"resize small: 1 new, {args.small} reused, 0 quarantined"
    return 0 if speedup >= TARGET and lines[-1:] == [expected] else 1


if __name__ == "__main__":
    sys.exit(main())
