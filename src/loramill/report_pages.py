"""HTML for Snakemake's report (``snakemake --report report.html``, report/workflow.rst).

The report shows a result by its type: an HTML result opens in a frame, a Markdown one is only a
``data:`` download link that Chromium refuses to open. So what is written as Markdown (the model
card, the text evaluation) is also rendered as an HTML page.

Its first screen is the workflow description, which Snakemake renders from reStructuredText and
which can take in an HTML file (``raw`` directive) but not compute anything. So each dataset's
overview — its grid, fitted into a thumbnail (the full grid is a result of its own), and its loss
curve, both embedded — is an HTML fragment, ``results/<ds>/overview.html`` (the ``overview``
rule), that the description takes in.
"""

from __future__ import annotations

import base64
import html
import io
import os

from loramill.files import write_text

THUMBNAIL_SIDE = 1024  # px, longest side of a grid's thumbnail: twice what the front page shows
PAGE_STYLE = "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}"


def markdown_page(markdown: str, title: str) -> str:
    """``markdown`` (with tables and fenced code) as a standalone HTML page."""
    import markdown as md

    body = md.markdown(markdown, extensions=["tables", "fenced_code"])
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{PAGE_STYLE}</style></head><body>\n{body}\n</body></html>\n"
    )


def png_data_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def thumbnail(path: str | os.PathLike, side: int = THUMBNAIL_SIDE) -> bytes:
    """The PNG at ``path`` fitted into ``side``×``side`` (never enlarged), as PNG bytes."""
    from PIL import Image

    with Image.open(path) as image:
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        out = io.BytesIO()
        image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def overview_html(
    name: str, loss_png: str | os.PathLike, grid_png: str | os.PathLike | None
) -> str:
    """A dataset's overview fragment: its name, grid thumbnail (image datasets) and loss curve."""
    title = html.escape(name)
    figures = []
    if grid_png is not None:
        figures.append(("loramill-grid", f"evaluation grid of {title}", thumbnail(grid_png)))
    with open(loss_png, "rb") as f:
        figures.append(("loramill-loss", f"training loss of {title}", f.read()))
    images = "\n".join(
        f'<img class="{cls}" alt="{alt}" src="{png_data_uri(data)}">' for cls, alt, data in figures
    )
    return (
        f'<section class="loramill-overview" data-dataset="{title}">\n'
        f"<h3>{title}</h3>\n{images}\n</section>\n"
    )


def write_overview(
    name: str,
    overview_path: str | os.PathLike,
    loss_png: str | os.PathLike,
    grid_png: str | os.PathLike | None = None,
) -> None:
    """The ``overview`` stage: ``results/<ds>/overview.html``."""
    write_text(overview_path, overview_html(name, loss_png, grid_png))
