"""The caption review page's local server (Flask, on Werkzeug's threaded server).

It listens on the loopback only, and every request must carry the random token of its URL
(``?token=`` or the ``X-Loramill-Token`` header, as the page sends it), as Jupyter does: other
users of the machine, and web pages in the browser, cannot read or write the captions. It
reads the dataset's images and the workflow's results, and writes one file: the dataset's
``metadata.csv`` (loramill.captions.review.table).
"""

from __future__ import annotations

import hmac
import io
import threading
from pathlib import Path
from typing import Any

from flask import Flask, Response, abort, jsonify, render_template, request, send_from_directory
from PIL import Image

from loramill import LoramillError
from loramill.captions.review.dataset import ReviewedDataset
from loramill.captions.review.table import Conflict

STATIC = Path(__file__).with_name("static")
ASSETS = ("review.js", "review.css")
THUMBNAIL = 256  # pixels on the longer side


def thumbnail(path: Path) -> bytes:
    """A JPEG of the image at most THUMBNAIL pixels wide and high (Pillow's bomb limit on)."""
    with Image.open(path) as image:
        image.draft("RGB", (THUMBNAIL, THUMBNAIL))  # JPEG: decoded small to begin with
        small = image.convert("RGB")
    small.thumbnail((THUMBNAIL, THUMBNAIL))
    out = io.BytesIO()
    small.save(out, "JPEG", quality=85)
    return out.getvalue()


def create_app(dataset: ReviewedDataset, token: str) -> Flask:
    """The page, its assets and its API for ``dataset``, behind ``token``."""
    app = Flask(__name__, static_folder=None, template_folder=str(STATIC))
    saving = threading.Lock()  # one save at a time: each compares versions, then writes

    @app.before_request
    def require_token() -> None:
        given = request.headers.get("X-Loramill-Token") or request.args.get("token", "")
        if not hmac.compare_digest(given.encode(), token.encode()):
            abort(403, "this page needs the token of the URL make captions printed")

    @app.get("/")
    def page() -> str:
        return render_template("index.html", token=token, dataset=dataset.name)

    @app.get("/assets/<name>")
    def asset(name: str) -> Response:
        if name not in ASSETS:
            abort(404)
        return send_from_directory(STATIC, name)

    @app.get("/api/state")
    def state() -> Response:
        return jsonify(dataset.state())

    @app.get("/thumbnail/<path:image>")
    def image_thumbnail(image: str) -> Response:
        if image not in dataset.resized():  # only the resized images, never another path
            abort(404)
        data = thumbnail(dataset.results / "resized" / image)
        return Response(data, mimetype="image/jpeg", headers={"Cache-Control": "private"})

    @app.post("/api/preview")
    def preview() -> Response:
        body = _json()
        if not all(isinstance(body.get(key), str) for key in ("image", "prompt", "mode")):
            raise LoramillError("preview: image, prompt and mode, each a text")
        caption = dataset.preview(body["image"], body["prompt"], body["mode"])
        return jsonify({"training": caption})

    @app.post("/api/save")
    def save() -> Response:
        body = _json()
        if not isinstance(body.get("version"), str):
            raise LoramillError("version: the version of metadata.csv the page read")
        with saving:
            table = dataset.table
            table.save(body["version"], dataset.changes(body.get("changes"), table))
            return jsonify(dataset.state())

    @app.errorhandler(LoramillError)
    def refused(error: LoramillError) -> tuple[Response, int]:
        return jsonify({"error": str(error)}), 409 if isinstance(error, Conflict) else 400

    return app


def _json() -> dict[str, Any]:
    body = request.get_json(silent=True)
    if not isinstance(body, dict):
        raise LoramillError("the request needs a JSON object")
    return body
