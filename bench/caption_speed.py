"""Captioning throughput, batched against one image per call, and add-one (issue #10).

On the tiny BLIP built offline (loramill.demo.tiny_models.build_tiny_blip) and --images generated
512 × 512 pictures, in the same run: ``caption_dataset`` with caption.batch_size 1 and with
--batch, each with an empty per-image cache; captions/s of each and the ratio. Then one image
is added and the stage runs again: its log line must say exactly 1 captioned.

    .venv/bin/python bench/caption_speed.py [--images 64] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

from loramill.captions.autocaption import caption_dataset
from loramill.demo.images import draw_picture
from loramill.demo.tiny_models import build_tiny_blip


def make_resized(folder: Path, count: int, start: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "manifest.json"
    images = json.loads(manifest.read_text())["images"] if manifest.exists() else []
    for index in range(start, start + count):
        rnd = random.Random(index)
        colour = rnd.choice(["red", "blue", "green", "yellow"])
        picture = draw_picture("circles", colour, "white", (512, 512), rnd)
        picture.save(folder / f"image_{index:04d}.png")
        images.append({"file": f"image_{index:04d}.png"})
    manifest.write_text(json.dumps({"images": images}))


def timed(resized: Path, out: Path, config: dict, cache: Path) -> float:
    start = time.perf_counter()
    caption_dataset(resized, out, config, dataset="", trigger="", cache_dir=cache, name="bench")
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("loramill.captions.autocaption").addHandler(handler)
    logging.getLogger("loramill.captions.autocaption").setLevel(logging.INFO)
    with tempfile.TemporaryDirectory(prefix="caption-bench-") as tmp:
        root = Path(tmp)
        model = str(build_tiny_blip(root / "tiny-blip"))
        make_resized(root / "resized", args.images)
        config = {"backend": "blip", "model": model, "max_new_tokens": 20, "device": "cpu"}
        one = timed(root / "resized", root / "one.jsonl", {**config, "batch_size": 1}, root / "c1")
        batched = {**config, "batch_size": args.batch}
        many = timed(root / "resized", root / "many.jsonl", batched, root / "c2")
        same = (root / "one.jsonl").read_bytes() == (root / "many.jsonl").read_bytes()
        print(f"batch 1   {args.images / one:7.1f} captions/s ({one:.1f} s)")
        print(f"batch {args.batch:<3} {args.images / many:7.1f} captions/s ({many:.1f} s)")
        print(f"speedup   {one / many:7.2f}×; same captions: {same}")
        make_resized(root / "resized", 1, start=args.images)
        timed(root / "resized", root / "many.jsonl", batched, root / "c2")
        print("add one →", lines[-1])
        expected = f"caption bench: 1 captioned, {args.images} reused"
    return 0 if lines[-1] == expected and same else 1


if __name__ == "__main__":
    sys.exit(main())
