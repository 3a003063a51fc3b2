"""A dataset as the caption review page finds it after the caption stage (issue #34): images
in ``data/<ds>/``, resized and auto-captioned into ``results/<ds>/``, and the server for it."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

from conftest import SMALL_BUCKETS

from loramill.captions.merge_rules import Rules
from loramill.captions.review.dataset import ReviewedDataset
from loramill.captions.review.server import create_app
from loramill.demo.images import generate_dataset
from loramill.files import write_jsonl
from loramill.prepare.resize import resize_dataset

TOKEN = "t0ken-for-tests"
MERGE = {"remove_tags": ["blurry"], "replace_tags": {"1girl": "one girl"}}


def review_dataset(root: Path, count: int = 6, trigger: str = "zzt") -> ReviewedDataset:
    """``count`` stripe pictures as dataset ``bands`` under ``root``, each auto caption a few
    tags (one of them removed by the merge rules, one replaced)."""
    data, results = root / "data" / "bands", root / "results" / "bands"
    generate_dataset(data, "stripes", count, seed=1)
    manifest = resize_dataset(data / "images", results / "resized", SMALL_BUCKETS,
                              cache_dir=root / "cache")  # fmt: skip
    auto = [
        {"image": e["file"], "image_sha256": e["sha256"],
         "caption": f"stripes, band {n}, blurry, 1girl" if n % 2 else f"stripes, band {n}"}
        for n, e in enumerate(manifest["images"])
    ]  # fmt: skip
    write_jsonl(results / "auto_captions.jsonl", auto)
    return ReviewedDataset("bands", data, results, Rules.from_config(MERGE, [trigger]))


@contextlib.contextmanager
def serving(dataset: ReviewedDataset) -> Iterator[str]:
    """The review server on a free loopback port, in a thread; its base URL."""
    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, create_app(dataset, TOKEN), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        server.shutdown()
        server.server_close()
