"""Procedural image datasets: the bundled demo, test fixtures and benchmark corpora.

Images come in mixed sizes, aspect ratios and formats (PNG, JPEG with an EXIF rotation, WebP,
RGBA and palette PNGs) so the resize stage meets what real folders contain. File names
describe the picture, which the template captioner turns into captions.

    python -m loramill.demo.images OUT_DIR NAME STYLE COUNT [SEED]
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

# The embedded model's world (models/pretrain_tiny_sd.py draws from the same palette): it knows
# these colours and backgrounds, and filled circles, squares and triangles — not rings, not
# stripes. The demo datasets teach those.
COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 20),
}
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
SIZES = [(96, 64), (64, 96), (80, 80), (128, 72), (72, 120), (100, 100), (160, 90), (64, 64)]
# Cycled per image: (extension, PIL mode, extra save options).
FORMATS = [("png", "RGB"), ("jpg", "RGB"), ("webp", "RGB"), ("png", "RGBA"), ("png", "P")]
STYLES = ("bands", "stripes", "circles")
EXIF_ORIENTATION = 0x0112


def draw_picture(
    style: str, colour: str, background: str, size: tuple[int, int], rnd: random.Random
) -> Image.Image:
    """``bands``: horizontal bands; ``stripes``: diagonal bands; ``circles``: one ring (a
    circle's outline). Each is sized by the short side, so the square
    crop the resize stage keeps shows the same motif at any aspect ratio."""
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    w, h = size
    side, fill = min(w, h), COLOURS[colour]
    if style == "bands":
        period = side * rnd.uniform(0.28, 0.32)
        y = rnd.uniform(-period, 0)
        while y < h:
            draw.rectangle((0, y, w, y + period / 2), fill=fill)
            y += period
    elif style == "circles":
        r = side * rnd.uniform(0.28, 0.4)
        x, y = (c / 2 + rnd.uniform(-0.08, 0.08) * side for c in size)
        width = max(2, round(side * rnd.uniform(0.09, 0.12)))
        draw.ellipse((x - r, y - r, x + r, y + r), outline=fill, width=width)
    elif style == "stripes":
        period = round(side * rnd.uniform(0.36, 0.44))
        for offset in range(-h - period, w + period, period):
            band = period // 2
            draw.polygon(
                [(offset, 0), (offset + band, 0), (offset + band + h, h), (offset + h, h)],
                fill=fill,
            )
    else:
        raise ValueError(f"unknown style '{style}' (choose from {', '.join(STYLES)})")
    return image


def save_picture(image: Image.Image, path: Path, mode: str, rotate_exif: bool) -> None:
    if mode == "RGBA":
        image = image.convert("RGBA")
        image.putalpha(Image.linear_gradient("L").resize(image.size))
    elif mode == "P":
        image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    if rotate_exif and path.suffix == ".jpg":
        # Store the pixels rotated and let EXIF say "rotate 90° CW to display", as phones do.
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = 6
        image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, quality=90)
    else:
        image.save(path)


def generate_dataset(root: str | os.PathLike, style: str, count: int, seed: int = 0) -> list[Path]:
    """Write ``count`` images into ``root/images``; returns their paths."""
    rnd = random.Random(f"{style}:{seed}")
    images_dir = Path(root) / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    colours, backgrounds = sorted(COLOURS), sorted(BACKGROUNDS)
    for index in range(count):
        # Every colour on every background in turn: a balanced set, whatever the count.
        colour = colours[index % len(colours)]
        background = backgrounds[index // len(colours) % len(backgrounds)]
        extension, mode = FORMATS[index % len(FORMATS)]
        size = SIZES[index % len(SIZES)]
        name = f"{colour}_{style.rstrip('s')}_on_{background}_{index:02d}.{extension}"
        image = draw_picture(style, colour, background, size, rnd)
        path = images_dir / name
        save_picture(image, path, mode, rotate_exif=index % 4 == 1)
        paths.append(path)
    return paths


if __name__ == "__main__":
    out, name, style, count, *rest = sys.argv[1:]
    generate_dataset(Path(out) / name, style, int(count), int(rest[0]) if rest else 0)
