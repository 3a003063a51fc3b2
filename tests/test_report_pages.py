"""What the report is made of besides Snakemake's own pages (loramill.report_pages): the model
card as a web page, and each dataset's overview fragment for the first screen. The report itself,
in a browser: tests/test_report.py."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import torch
from conftest import SAMPLE_PROVENANCE
from PIL import Image

from loramill.export.model_card import write_model_card
from loramill.files import save_safetensors
from loramill.report_pages import THUMBNAIL_SIDE, markdown_page, write_overview


def embedded(fragment: str) -> dict[str, Image.Image]:
    """The images of an overview fragment, by class."""
    found = re.findall(r'<img class="([\w-]+)" alt="[^"]*" src="data:image/png;base64,([^"]+)">',
                       fragment)  # fmt: skip
    return {cls: Image.open(io.BytesIO(base64.b64decode(data))) for cls, data in found}


def picture(path, size, seed):
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_markdown_page_renders_tables_and_code():
    page = markdown_page(
        "# card\n\n| a | b |\n| --- | --- |\n| 1 | 2 |\n\n```python\nx<1\n```\n", "t"
    )
    assert page.startswith("<!DOCTYPE html>") and "<title>t</title>" in page
    assert "<h1>card</h1>" in page and "<td>1</td>" in page
    assert '<pre><code class="language-python">x&lt;1\n</code></pre>' in page


def test_model_card_is_also_a_web_page(tmp_path):
    metadata = {
        "loramill.provenance": json.dumps(SAMPLE_PROVENANCE),
        "modelspec.trigger_phrase": "smplx",
        "ss_tag_frequency": json.dumps({"img": SAMPLE_PROVENANCE["tag_frequency"]}),
    }
    kohya = tmp_path / "tiny.safetensors"
    save_safetensors({"w": torch.zeros(1)}, kohya, metadata)
    write_model_card(kohya, tmp_path / "tiny.md", "tiny", "../grids/tiny.png")
    card, page = (tmp_path / "tiny.md").read_text(), (tmp_path / "tiny.html").read_text()
    assert card.startswith("# tiny\n") and "<h1>tiny</h1>" in page
    assert "| rank | 4 |" in card and "<td>rank</td>\n<td>4</td>" in page
    assert "<td>smplx</td>\n<td>3</td>" in page
    assert "pipe.load_lora_weights(" in page and "<table>" in page
    # The report shows the page from a data: URL, where ../grids/tiny.png leads nowhere: the
    # page names the grid instead of showing a broken picture; the Markdown card shows it.
    assert "](../grids/tiny.png)" in card
    assert "<img" not in page and "<code>../grids/tiny.png</code>" in page


def test_overview_embeds_a_grid_thumbnail_and_the_loss_curve(tmp_path):
    grid = picture(tmp_path / "grid.png", (600, 2400), seed=1)
    loss = picture(tmp_path / "loss.png", (600, 350), seed=2)
    write_overview("wide_bands", tmp_path / "overview.html", loss, grid)
    fragment = (tmp_path / "overview.html").read_text()
    assert '<section class="loramill-overview" data-dataset="wide_bands">' in fragment
    images = embedded(fragment)
    assert set(images) == {"loramill-grid", "loramill-loss"}
    # the grid fitted into the thumbnail size: the same picture, smaller
    thumb = images["loramill-grid"]
    assert thumb.size == (THUMBNAIL_SIDE // 4, THUMBNAIL_SIDE)
    with Image.open(grid) as full:
        expected = full.resize(thumb.size, Image.Resampling.LANCZOS)
    difference = np.abs(np.asarray(thumb, float) - np.asarray(expected, float)).mean()
    assert difference < 2
    # the loss curve as it is
    with Image.open(loss) as curve:
        assert np.array_equal(np.asarray(images["loramill-loss"]), np.asarray(curve))


def test_a_text_datasets_overview_has_its_loss_curve_only(tmp_path):
    loss = picture(tmp_path / "adapter_loss.png", (600, 350), seed=3)
    write_overview("station_procedures", tmp_path / "overview.html", loss)
    assert set(embedded((tmp_path / "overview.html").read_text())) == {"loramill-loss"}


def test_a_small_grid_is_not_enlarged(tmp_path):
    grid = picture(tmp_path / "grid.png", (300, 200), seed=4)
    loss = picture(tmp_path / "loss.png", (60, 35), seed=5)
    write_overview("tiny", tmp_path / "overview.html", loss, grid)
    assert embedded((tmp_path / "overview.html").read_text())["loramill-grid"].size == (300, 200)
