"""Procedural image datasets: the bundled demo, test fixtures and benchmark corpora.

Images come in mixed sizes, aspect ratios and formats (PNG, JPEG with an EXIF rotation, WebP,
RGBA and palette PNGs) so the resize stage meets what real folders contain. File names
describe the picture, which the template captioner turns into captions.

    python -m loramill.demo_data OUT_DIR NAME STYLE COUNT [SEED]
"""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 50),
    "orange": (240, 140, 30),
    "yellow": (240, 220, 40),
    "green": (40, 180, 80),
    "teal": (30, 170, 170),
    "blue": (40, 80, 220),
    "violet": (150, 60, 200),
    "pink": (240, 110, 170),
}
BACKGROUNDS = {"navy": (15, 20, 60), "black": (10, 10, 12), "cream": (245, 235, 210)}
SIZES = [(96, 64), (64, 96), (80, 80), (128, 72), (72, 120), (100, 100), (160, 90), (64, 64)]
# Cycled per image: (extension, PIL mode, extra save options).
FORMATS = [("png", "RGB"), ("jpg", "RGB"), ("webp", "RGB"), ("png", "RGBA"), ("png", "P")]
STYLES = ("circles", "stripes")
EXIF_ORIENTATION = 0x0112


def draw_picture(
    style: str, colour: str, background: str, size: tuple[int, int], rnd: random.Random
) -> Image.Image:
    image = Image.new("RGB", size, BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    w, h = size
    fill = COLOURS[colour]
    if style == "circles":
        for _ in range(rnd.randint(1, 4)):
            r = rnd.randint(min(w, h) // 8, min(w, h) // 3)
            x, y = rnd.randint(r, w - r), rnd.randint(r, h - r)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill, outline=(255, 255, 255))
    elif style == "stripes":
        width = rnd.randint(4, 12)
        for offset in range(-h, w, width * 2):
            draw.polygon(
                [(offset, 0), (offset + width, 0), (offset + width + h, h), (offset + h, h)],
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
    for index in range(count):
        colour = rnd.choice(sorted(COLOURS))
        background = rnd.choice(sorted(BACKGROUNDS))
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
