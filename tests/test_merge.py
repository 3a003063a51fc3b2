"""Caption merge: human edits win, are never written, and bad edit files are named."""

from __future__ import annotations

import json

import pytest

from loramill import LoramillError
from loramill.files import read_jsonl, write_jsonl
from loramill.merge import merge_captions, with_trigger


@pytest.fixture
def auto(tmp_path):
    path = tmp_path / "auto.jsonl"
    write_jsonl(
        path,
        [
            {"image": "b.png", "caption": "blue circle", "captioner": "template"},
            {"image": "a.png", "caption": "red circle", "captioner": "template"},
        ],
    )
    return path


def test_human_edit_overrides_and_trigger_is_prepended(tmp_path, auto):
    edits = tmp_path / "captions"
    edits.mkdir()
    (edits / "a.txt").write_text("a crimson disc, studio light\n")
    (edits / "gone.txt").write_text("an image that was deleted\n")
    before = (edits / "a.txt").read_bytes()

    report = merge_captions(auto, edits, tmp_path / "out.jsonl", tmp_path / "report.json", "zzt")

    assert read_jsonl(tmp_path / "out.jsonl") == [
        {"image": "a.png", "caption": "zzt, a crimson disc, studio light", "source": "human"},
        {"image": "b.png", "caption": "zzt, blue circle", "source": "auto"},
    ]
    assert report["stale_edits"] == ["gone.txt"]
    assert report["tag_frequency"]["zzt"] == 2
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (edits / "a.txt").read_bytes() == before
    assert sorted(p.name for p in edits.iterdir()) == ["a.txt", "gone.txt"]


def test_no_edits_folder_means_auto_captions(tmp_path, auto):
    merge_captions(auto, tmp_path / "missing", tmp_path / "o.jsonl", tmp_path / "r.json", "")
    assert [r["source"] for r in read_jsonl(tmp_path / "o.jsonl")] == ["auto", "auto"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"first line\nsecond line\n", r"a\.txt:2: a caption file holds one caption"),
        (b"\n\n", r"a\.txt: empty caption"),
        (b"caf\xe9 latin-1", r"a\.txt: not UTF-8 text \(byte 3\)"),
    ],
)
def test_malformed_edit_names_file_and_line(tmp_path, auto, content, message):
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "a.txt").write_bytes(content)
    with pytest.raises(LoramillError, match=message):
        merge_captions(auto, tmp_path / "captions", tmp_path / "o.jsonl", tmp_path / "r.json", "t")
    assert not (tmp_path / "o.jsonl").exists()


def test_trigger_is_not_doubled():
    assert with_trigger("zzt, a cat", "zzt") == "zzt, a cat"
    assert with_trigger("ZZT on a mat", "zzt") == "ZZT on a mat"
    assert with_trigger("zztop band", "zzt") == "zzt, zztop band"
    assert with_trigger("a cat", "") == "a cat"
