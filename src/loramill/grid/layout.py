"""Where each cell and label of a grid goes, pages included, and the drawing of a page.

Pure: fonts and Pillow only, no model. Laid out like AUTOMATIC1111's X/Y/Z plot — X across
columns, Y down rows, one titled sub-grid per Z value, stacked. A grid larger than the
megapixel cap is split into pages instead of failing (50 checkpoints at 1024 px would pass
Pillow's decompression-bomb limit, which stays on): whole sub-grids per page while one fits,
else column (and if need be row) slices of a sub-grid.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)
# Tiny test models render 64 px cells, unreadable next to their labels and in any image viewer.
# Such cells are enlarged by an integer factor with NEAREST: every generated pixel becomes an
# exact block, so nothing is invented and a cell still maps bit-for-bit to the pipeline output.
MIN_CELL = 256

Box = tuple[int, int, int, int]


def wrap(text: str, font: Any, width: float) -> list[str]:
    """Greedy word wrap; a word wider than the line is split by characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    lines.append(line)
    return lines


@dataclass(frozen=True)
class Page:
    """A rectangle of the grid: these Z sub-grids, these columns and rows of each."""

    zs: tuple[int, ...]
    xs: tuple[int, ...]
    ys: tuple[int, ...]


@dataclass
class Layout:
    width: int
    height: int
    # (text, x, y, anchor) for ImageDraw.text; cells[(z, y, x)] = (x0, y0, x1, y1)
    texts: list[tuple[str, float, float, str]]
    cells: dict[tuple[int, int, int], Box]


@dataclass(frozen=True)
class Labels:
    columns: tuple[str, ...]
    rows: tuple[str, ...]
    titles: tuple[str, ...]


def cell_scale(resolution: int) -> int:
    return math.ceil(MIN_CELL / resolution)


def grid_font(cell: int) -> Any:
    """Font sized to the displayed cell (A1111 uses ~1/25 of the cell; a little larger here
    because the default font is narrow). FreeType rendering is deterministic, so equal inputs
    give equal PNG bytes on one installation."""
    from PIL import ImageFont

    return ImageFont.load_default(size=max(12, cell // 16))


def layout(cell: int, labels: Labels, page: Page, font: Any) -> Layout:
    pad = font.size // 2
    ascent, descent = font.getmetrics()
    line = ascent + descent + font.size // 4
    row_texts = [labels.rows[y] for y in page.ys]
    left = math.ceil(max(font.getlength(t) for t in row_texts)) + 2 * pad if any(row_texts) else 0
    width = left + cell * len(page.xs)
    column_lines = [wrap(labels.columns[x], font, cell - 2 * pad) for x in page.xs]
    header = max(len(lines) for lines in column_lines) * line + 2 * pad
    if not any(labels.columns[x] for x in page.xs):
        header = 0  # no X axis: no label line above the cells
    texts: list[tuple[str, float, float, str]] = []
    cells: dict[tuple[int, int, int], Box] = {}
    y = 0
    for n, z in enumerate(page.zs):
        if n:
            y += 2 * pad  # white gap so sub-grids read as separate plots
        if labels.titles[z]:
            title_lines = wrap(labels.titles[z], font, width - 2 * pad)
            texts += [(t, pad, y + pad + i * line, "la") for i, t in enumerate(title_lines)]
            y += len(title_lines) * line + 2 * pad
        for c, lines in enumerate(column_lines):
            # Bottom-align the label block so one-line labels sit just above their cells.
            top = y + header - pad - len(lines) * line
            center = left + c * cell + cell / 2
            texts += [(t, center, top + i * line, "ma") for i, t in enumerate(lines) if t]
        y += header
        for r, row in enumerate(page.ys):
            if labels.rows[row]:
                texts.append((labels.rows[row], left / 2, y + r * cell + cell / 2, "mm"))
            for c, column in enumerate(page.xs):
                x0 = left + c * cell
                cells[(z, row, column)] = (x0, y + r * cell, x0 + cell, y + (r + 1) * cell)
        y += cell * len(page.ys)
    return Layout(width, y, texts, cells)


def paginate(cell: int, labels: Labels, font: Any, max_pixels: int) -> list[Page]:
    """Pages of at most ``max_pixels`` each (one cell per page at worst), in reading order."""
    xs, ys = tuple(range(len(labels.columns))), tuple(range(len(labels.rows)))

    def fits(page: Page) -> bool:
        shape = layout(cell, labels, page, font)
        return shape.width * shape.height <= max_pixels

    pages: list[Page] = []
    zs: tuple[int, ...] = ()
    for z in range(len(labels.titles)):
        if fits(Page((*zs, z), xs, ys)):
            zs = (*zs, z)
            continue
        if zs:
            pages.append(Page(zs, xs, ys))
            zs = ()
        if fits(Page((z,), xs, ys)):
            zs = (z,)
            continue
        pages += _slices(z, xs, ys, fits)
    if zs:
        pages.append(Page(zs, xs, ys))
    return pages


def _slices(z: int, xs: tuple[int, ...], ys: tuple[int, ...], fits: Any) -> list[Page]:
    """One sub-grid too large for a page, halved until each part fits: columns first (rows
    stay together while they can), a single cell at worst. Each part is checked itself, as
    label sizes differ between parts."""
    page = Page((z,), xs, ys)
    if fits(page) or (len(xs) == 1 and len(ys) == 1):
        return [page]
    if len(xs) > 1:
        half = (len(xs) + 1) // 2
        return _slices(z, xs[:half], ys, fits) + _slices(z, xs[half:], ys, fits)
    half = (len(ys) + 1) // 2
    return _slices(z, xs, ys[:half], fits) + _slices(z, xs, ys[half:], fits)


def compose(shape: Layout, images: dict[tuple[int, int, int], Any], scale: int, font: Any):
    """The page's image and its labels' boxes. Each image is enlarged by ``scale`` and
    centred in its cell (smaller when resolution is an axis)."""
    from PIL import Image, ImageDraw

    canvas = Image.new("RGB", (shape.width, shape.height), BACKGROUND)
    for key, (x0, y0, x1, y1) in shape.cells.items():
        image = images[key]
        size = (image.width * scale, image.height * scale)
        image = image.convert("RGB").resize(size, Image.Resampling.NEAREST)
        canvas.paste(image, (x0 + (x1 - x0 - size[0]) // 2, y0 + (y1 - y0 - size[1]) // 2))
    draw = ImageDraw.Draw(canvas)
    labels = []
    for text, tx, ty, anchor in shape.texts:
        draw.text((tx, ty), text, fill=INK, font=font, anchor=anchor)
        left, top, right, bottom = draw.textbbox((tx, ty), text, font=font, anchor=anchor)
        box = [math.floor(left), math.floor(top), math.ceil(right), math.ceil(bottom)]
        labels.append({"text": text, "box": box})
    return canvas, labels


def png_info(parameters: str, description: dict[str, Any]) -> Any:
    """PNG text chunks: A1111's ``parameters`` line and the full description as JSON."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", parameters)
    info.add_text("loramill.grid", json.dumps(description, sort_keys=True))
    return info
