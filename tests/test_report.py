"""The report (`make report`) as a user sees it: in a real Chromium (Debian's package), its first
screen shows every dataset's grid and loss curve, and a model card opens in one click."""

from __future__ import annotations

import base64
import io
import itertools
import time
from typing import Any

import numpy as np
import pytest
from headless_chromium import CHROMIUM, Page
from PIL import Image

pytestmark = [
    pytest.mark.workflow,
    pytest.mark.skipif(
        CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install chromium)"
    ),
]
SCREEN = (1280, 800)  # a laptop's browser window

# Every image of the datasets' overviews on the first page: dataset, kind and where it is.
SHOWN = """(() => {
  const images = [...document.querySelectorAll('.loramill-overview img')];
  if (!images.length || !images.every(i => i.complete && i.naturalWidth)) return null;
  return images.map(i => {
    const r = i.getBoundingClientRect();
    return {dataset: i.closest('[data-dataset]').dataset.dataset, kind: i.className,
            box: [r.left, r.top, r.right, r.bottom]};
  });
})()"""
FRAME = """(() => {
  const f = document.querySelector('iframe');
  if (!f) return null;
  const r = f.getBoundingClientRect();
  return {src: f.src, box: [r.left, r.top, r.right, r.bottom]};
})()"""


def correlation(shown: Image.Image, box: tuple[float, ...], original: Image.Image) -> float:
    """How alike the screen inside ``box`` and ``original`` scaled to it are (Pearson's r of
    the grey levels): about 1 for the same picture, far lower for another one or a few pixels
    off. The box's edges may fall between pixels: the best of the crops around it counts."""
    left, top = round(box[0]), round(box[1])
    size = (round(box[2] - box[0]), round(box[3] - box[1]))
    scaled = np.asarray(original.convert("L").resize(size, Image.Resampling.LANCZOS), np.float64)
    b = scaled - scaled.mean()
    best = -1.0
    for dx, dy in itertools.product((-1, 0, 1), repeat=2):
        x, y = left + dx, top + dy
        crop = np.asarray(shown.crop((x, y, x + size[0], y + size[1])).convert("L"), np.float64)
        a = crop - crop.mean()
        best = max(best, float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum())))
    return best


def settled(page: Page, expression: str) -> tuple[Any, Image.Image]:
    """``expression`` (where things are) and a screenshot, taken once the layout stopped
    moving: the report's navigation bar takes its width a moment after the page is in."""
    found = page.wait_for(expression)
    for _ in range(50):
        time.sleep(0.2)
        screen = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
        before, found = found, page.wait_for(expression)
        if found == before:
            return found, screen
    raise AssertionError("the report's layout never settled")


def original(checkout, dataset, kind):
    if kind == "loramill-grid":
        return checkout / "grids" / f"{dataset}.png"
    losses = [checkout / "results" / dataset / n for n in ("loss.png", "adapter_loss.png")]
    return next(p for p in losses if p.exists())


def test_first_screen_shows_every_datasets_grid_and_loss_curve(demo_report, demo_run):
    from test_workflow import demo_datasets

    with Page(*SCREEN) as page:
        page.open(demo_report)
        shown, screen = settled(page, SHOWN)
    assert screen.size == SCREEN
    kinds = {(s["dataset"], s["kind"]) for s in shown}
    images, texts = demo_datasets(demo_run), demo_datasets(demo_run, "text")
    assert kinds == {(ds, k) for ds in images for k in ("loramill-grid", "loramill-loss")} | {
        (ds, "loramill-loss") for ds in texts
    }
    for item in shown:
        box = item["box"]
        where = f"{item['dataset']} {item['kind']} at {box}"
        # on the first screen, whole, and large enough to read
        assert box[0] >= 0 and box[1] >= 0, where
        assert box[2] <= SCREEN[0] and box[3] <= SCREEN[1], where
        assert box[3] - box[1] >= 150, where
        # and what is painted there is that picture
        with Image.open(original(demo_run, item["dataset"], item["kind"])) as picture:
            assert correlation(screen, box, picture) > 0.9, where


def test_model_card_opens_in_one_click(demo_report, demo_run):
    ds = "wide_bands"
    card = demo_run / "exports" / f"{ds}.html"
    with Page(*SCREEN) as page:
        page.open(demo_report)
        page.wait_for(SHOWN)
        links = page.evaluate("[...document.links].map(a => [a.textContent, a.href])")
        (href,) = [h for text, h in links if text == "model card" and f"exports/{ds}.html" in h]
        page.evaluate(f"[...document.links].find(a => a.href === {href!r}).click()")
        frame, screen = settled(page, FRAME)
    # the card's web page, shown as HTML in the report's viewer
    head, _, data = frame["src"].partition(";base64,")
    assert head.startswith("data:text/html")
    assert base64.b64decode(data) == card.read_bytes()
    assert f"<h1>{ds}</h1>" in card.read_text() and "<table>" in card.read_text()
    # painted as Chromium paints the page on its own at the frame's size
    box = tuple(round(v) for v in frame["box"])
    with Page(box[2] - box[0], box[3] - box[1]) as page:
        page.open(card)
        alone = np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"), np.float64)
    inside = np.asarray(screen.crop(box), dtype=np.float64)
    assert np.abs(inside - alone).mean() < 0.5


def test_a_validated_dataset_links_its_validation_plot(demo_report, demo_run):
    """paper_stripes has a validation folder: its links open results/<ds>/validation.png,
    which wide_bands (no validation) does not have."""
    with Page(*SCREEN) as page:
        page.open(demo_report)
        page.wait_for(SHOWN)
        links = page.evaluate("[...document.links].map(a => [a.textContent, a.href])")
    targets = [href for text, href in links if text == "validation loss"]
    assert len(targets) == 1 and "results/paper_stripes/validation.png" in targets[0]
    assert (demo_run / "results" / "paper_stripes" / "validation.png").is_file()
