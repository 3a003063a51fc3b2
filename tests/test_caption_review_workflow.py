"""The caption review page on a built project, end to end (issue #34): `make captions DS=…` (the
README's command) serves the page on the loopback behind a token; an edit saved there makes the
next train_all rerun merge → train for that dataset only, reaches the training captions, and
nothing in data/ but that dataset's metadata.csv was written."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from conftest import BIN, run_tool
from test_caption_review import snapshot
from workflow_plans import plan

from loramill.files import read_jsonl

pytestmark = pytest.mark.workflow
A = "wide_bands"


def call(url: str, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    headers = {"X-Loramill-Token": token} if token else {}
    data = None if body is None else json.dumps(body).encode()
    if data:
        headers["Content-Type"] = "application/json"
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {}


def test_an_edit_saved_in_the_page_reruns_its_chain_and_reaches_training(small_build, tmp_path):
    root = tmp_path / "repo"
    shutil.copytree(small_build.built, root, symlinks=True)
    before = snapshot(root / "data")
    venv = BIN.parent
    server = subprocess.Popen(
        ["make", "--no-print-directory", "-o", f"{venv}/.installed", "captions", f"DS={A}",
         f"VENV={venv}"],
        cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = ""
        while "http" not in line:
            line = server.stdout.readline()
            assert line or server.poll() is None, server.stderr.read()
        url, token = re.search(r"(http://127\.0\.0\.1:\d+)/\?token=(\S+)", line).groups()
        assert call(f"{url}/api/state", None)[0] == 403
        status, state = call(f"{url}/api/state", token)
        assert status == 200
        image = next(r for r in state["images"] if r["edit"] is None or not r["edit"]["sidecar"])
        change = {image["image"]: {"prompt": "a band under review, blurry", "mode": "replace"}}
        status, saved = call(f"{url}/api/save", token, {"version": state["version"],
                                                         "changes": change})  # fmt: skip
        assert status == 200
    finally:
        server.terminate()
        server.wait(timeout=60)
    after = snapshot(root / "data")
    assert {name for name in after if after[name] != before.get(name)} == {f"{A}/metadata.csv"}
    stderr, planned = plan(root)
    assert planned == {(stage, A) for stage in ("merge_captions", "train", "export", "grid")}
    assert f"stale: merge_captions {A}: captions edited (1 image)" in stderr
    run_tool("snakemake", "--cores", "1", f"results/{A}/captions.jsonl", cwd=root)
    merged = read_jsonl(root / "results" / A / "captions.jsonl")
    training = {r["image"]: r["caption"] for r in merged}
    shown = next(r["training"] for r in saved["images"] if r["image"] == image["image"])
    assert training[image["image"]] == shown
    assert "a band under review" in shown
    assert Path(root / "data" / A / "metadata.csv").is_file()
