"""Caption merge: edits from metadata.csv and sidecars, the merge rules in their order, stale
and orphaned edits, and bad edit files named by file and line. Edits are never written."""

from __future__ import annotations

import csv
import json
import logging
import unicodedata

import pytest

from loramill import LoramillError
from loramill.captions.edits import Edit, read_edits
from loramill.captions.merge import merge_captions
from loramill.captions.merge_rules import Rules, training_caption
from loramill.dataset_files import match_key
from loramill.files import read_jsonl, write_jsonl

AUTO = [
    {"image": "b.png", "caption": "blue circle", "image_sha256": "bb"},
    {"image": "a.png", "caption": "red circle", "image_sha256": "aa"},
    {"image": "café photo.png", "caption": "a cup", "image_sha256": "cc"},
]


@pytest.fixture
def ds(tmp_path):
    """A dataset folder with auto captions beside it."""
    (tmp_path / "ds").mkdir()
    write_jsonl(tmp_path / "auto.jsonl", AUTO)
    return tmp_path / "ds"


def merge(ds, trigger="zzt", **kwargs):
    out = ds.parent
    merge_captions(
        out / "auto.jsonl",
        ds / "captions",
        out / "captions.jsonl",
        out / "report.json",
        trigger,
        metadata_csv=ds / "metadata.csv",
        report_csv=out / "report.csv",
        **kwargs,
    )
    captions = {r["image"]: r["caption"] for r in read_jsonl(out / "captions.jsonl")}
    return captions, json.loads((out / "report.json").read_text())


def write_table(ds, *rows: str, header="filename,prompt,mode,image_sha256"):
    (ds / "metadata.csv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


# --- edits ------------------------------------------------------------------------------------


def test_metadata_csv_rows_in_every_mode(ds):
    write_table(
        ds,
        "a.png,a crimson disc,,aa",
        "b.png,studio light,append,",
        "café photo.png,hand drawn,prepend,",
    )
    before = (ds / "metadata.csv").read_bytes()
    captions, report = merge(ds)
    assert captions == {
        "a.png": "zzt, a crimson disc",
        "b.png": "zzt, blue circle, studio light",
        "café photo.png": "zzt, hand drawn, a cup",
    }
    assert report["edits"] == {"applied": 3, "unchanged": 0, "stale": [], "orphaned": []}
    assert (ds / "metadata.csv").read_bytes() == before
    write_table(ds, "a.png,,exclude,")
    captions, report = merge(ds)
    assert "a.png" not in captions and report["excluded"] == ["a.png"]


def test_sidecars_match_by_stem_case_extension_and_nfc(ds):
    (ds / "captions").mkdir()
    (ds / "captions" / "A.TXT").write_text("a crimson disc\n")
    (ds / "captions" / "b.png.caption").write_text("a navy disc\n")
    decomposed = unicodedata.normalize("NFD", "café photo.txt")
    (ds / "captions" / decomposed).write_text("a latte\n")
    captions, _ = merge(ds, trigger="")
    assert captions == {
        "a.png": "a crimson disc",
        "b.png": "a navy disc",
        "café photo.png": "a latte",
    }


def test_one_image_edited_in_both_places_is_an_error_naming_both(ds):
    write_table(ds, "a.png,a crimson disc,,")
    (ds / "captions").mkdir()
    (ds / "captions" / "a.txt").write_text("a red disc\n")
    with pytest.raises(LoramillError, match=r"^metadata\.csv:2 and captions/a\.txt: two edits"):
        merge(ds)


def test_stale_and_orphaned_edits_are_reported_and_kept(ds, caplog):
    write_table(ds, "a.png,a crimson disc,,0000", "gone.jpg,deleted image,,")
    before = (ds / "metadata.csv").read_bytes()
    with caplog.at_level(logging.INFO, logger="loramill"):
        captions, report = merge(ds, name="ds")
    assert captions["a.png"] == "zzt, a crimson disc"  # applied, and flagged
    assert report["edits"] == {
        "applied": 1,
        "unchanged": 0,
        "stale": ["metadata.csv:2"],
        "orphaned": ["metadata.csv:3"],
    }
    with open(ds.parent / "report.csv", newline="") as handle:
        assert list(csv.DictReader(handle)) == [
            {
                "edit": "metadata.csv:2",
                "image": "a.png",
                "problem": "stale: the image changed since this edit was written",
            },
            {"edit": "metadata.csv:3", "image": "", "problem": "orphaned: no such image"},
        ]
    messages = [r.getMessage() for r in caplog.records]
    assert "merge ds: 1 edits applied, 1 stale, 1 orphaned; 3 captions (0 excluded)" in messages
    assert (ds / "metadata.csv").read_bytes() == before


def test_only_edits_that_change_a_caption_count_as_applied(ds, caplog):
    """A seeded table where one row was rewritten reports one edit applied."""
    write_table(
        ds,
        "a.png,red circle,,aa",  # the auto caption, as seed-edits wrote it
        'b.png,"zzt, blue circle",,bb',  # the training caption it makes already
        "café photo.png,a latte,,cc",  # the one edit
    )
    with caplog.at_level(logging.INFO, logger="loramill"):
        captions, report = merge(ds, name="ds")
    assert captions["café photo.png"] == "zzt, a latte"
    assert (report["edits"]["applied"], report["edits"]["unchanged"]) == (1, 2)
    messages = [r.getMessage() for r in caplog.records]
    assert "merge ds: 1 edits applied, 0 stale, 0 orphaned; 3 captions (0 excluded)" in messages
    write_table(ds, "a.png,,exclude,aa")  # excluding an image changes its result too
    assert merge(ds)[1]["edits"]["applied"] == 1


def test_images_without_an_edit_row_are_named_with_the_seed_command(ds, caplog):
    write_table(ds, "a.png,red circle,,aa", "b.png,a navy disc,,bb")
    with caplog.at_level(logging.INFO, logger="loramill"):
        _, report = merge(ds, name="ds")
    assert report["no_edit_row"] == ["café photo.png"]
    messages = [r.getMessage() for r in caplog.records]
    assert "1 image has no edit row yet (make seed-edits DS=ds)" in messages
    (ds / "metadata.csv").unlink()  # sidecars only: no row is expected of any image
    (ds / "captions").mkdir()
    (ds / "captions" / "a.txt").write_text("a crimson disc\n")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="loramill"):
        _, report = merge(ds, name="ds")
    assert report["no_edit_row"] == []
    assert not [r for r in caplog.records if "no edit row" in r.getMessage()]


def test_an_excel_byte_order_mark_is_read_silently(ds, caplog):
    """Excel's "CSV UTF-8" starts the file with a BOM and ends lines with CRLF."""
    table = b"\xef\xbb\xbffilename,prompt,mode\r\na.png,a crimson disc,\r\n"
    (ds / "metadata.csv").write_bytes(table)
    (ds / "captions").mkdir()
    (ds / "captions" / "b.txt").write_bytes(b"\xef\xbb\xbfa navy disc\r\n")  # Notepad's
    with caplog.at_level(logging.WARNING, logger="loramill"):
        captions, _ = merge(ds)
    assert captions["a.png"] == "zzt, a crimson disc"
    assert captions["b.png"] == "zzt, a navy disc"
    assert caplog.records == []
    assert (ds / "metadata.csv").read_bytes() == table


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"filename,prompt\na.png,caf\xe9\n", r"metadata\.csv:2: not UTF-8 text"),
        (b"name,prompt\na.png,x\n", r"metadata\.csv:1: unknown column 'name'"),
        (b"filename\na.png\n", r"metadata\.csv:1: missing column 'prompt'"),
        (b"filename,prompt\na.png,x,extra\n", r"metadata\.csv:2: 3 fields, the header has 2"),
        (b"filename,prompt\na.png\n", r"metadata\.csv:2: 1 fields, the header has 2"),
        (b'filename,prompt\na.png,"open quote\n', r"metadata\.csv:\d+: unexpected end of data"),
        (b"filename,prompt\na.png,x\nA.PNG,y\n", r"csv:3: a second row for the image of metadata"),
        (b"filename,prompt\n../x.png,x\n", r"csv:2: '\.\./x\.png' is not an image of this data"),
        (b"filename,prompt,mode\na.png,x,merge\n", r"metadata\.csv:2: mode 'merge'; use one of"),
        (b"filename,prompt\na.png,\n", r"metadata\.csv:2: empty prompt"),
    ],
)  # fmt: skip
def test_malformed_metadata_names_file_and_line(ds, content, message):
    (ds / "metadata.csv").write_bytes(content)
    with pytest.raises(LoramillError, match=message):
        merge(ds)
    assert (ds / "metadata.csv").read_bytes() == content
    assert not (ds.parent / "captions.jsonl").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"first line\nsecond line\n", r"a\.txt:2: a caption file holds one caption"),
        (b"\n\n", r"a\.txt: empty caption"),
        (b"caf\xe9 latin-1", r"a\.txt:1: not UTF-8 text"),
    ],
)
def test_malformed_sidecar_names_file_and_line(ds, content, message):
    (ds / "captions").mkdir()
    (ds / "captions" / "a.txt").write_bytes(content)
    with pytest.raises(LoramillError, match=message):
        merge(ds)


def test_kohya_sidecars_on_request(ds):
    out = ds.parent / "kohya"
    merge(ds, sidecars_dir=out)
    assert list(out.iterdir()) == []
    merge(ds, sidecars_dir=out, settings={"write_sidecars": True})
    assert sorted(p.name for p in out.iterdir()) == ["a.txt", "b.txt", "café photo.txt"]
    assert (out / "b.txt").read_text() == "zzt, blue circle\n"


def test_no_edits_means_auto_captions(ds):
    captions, report = merge(ds, trigger="")
    assert captions == {r["image"]: r["caption"] for r in AUTO}
    assert report["auto"] == 3 and report["human"] == 0
    assert read_edits(None, None) == {}


# --- rules ------------------------------------------------------------------------------------


def caption(auto, edit=None, trigger=(), **merge_settings):
    return training_caption(auto, edit, Rules.from_config(merge_settings, list(trigger)))


def test_tag_cleanup():
    tags = "long_hair, Red Eyes,  blurry ,long hair, ^_^, smile"
    assert caption(tags) == "long hair, Red Eyes, blurry, ^_^, smile"
    assert caption(tags, remove_tags=["BLURRY", "smile"]) == "long hair, Red Eyes, ^_^"
    assert caption(tags, replace_tags={"red eyes": "crimson eyes"}).startswith(
        "long hair, crimson eyes"
    )
    assert caption(tags, dedupe_tags=False, underscores_to_spaces=False) == (
        "long_hair, Red Eyes, blurry, long hair, ^_^, smile"
    )


def test_trigger_words_once_in_order():
    assert caption("a cat", trigger=["zzt", "style"]) == "zzt, style, a cat"
    assert caption("style, a cat", trigger=["zzt", "style"]) == "zzt, style, a cat"
    assert caption("ZZT on a mat", trigger=["zzt"]) == "ZZT on a mat"
    assert caption("zztop band", trigger=["zzt"]) == "zzt, zztop band"
    assert caption("", trigger=["zzt"]) == "zzt"


def test_normalisation():
    assert caption("  a  cat ,, on a mat .  ") == "a cat, on a mat."
    assert caption("a cat , sitting ; happily !") == "a cat, sitting; happily!"


def test_modes_then_cleanup_then_trigger():
    edit = Edit("long_hair, zzt", "prepend", "", "metadata.csv:2")
    assert caption("smile, long hair", edit, trigger=["zzt"]) == "long hair, zzt, smile"
    assert caption("anything", Edit("", "exclude", "", "x")) is None
    assert caption("", Edit("a dog", "append", "", "x")) == "a dog"


def test_match_key():
    assert match_key("Photo.JPG") == match_key("photo") == match_key("photo.png")
    assert match_key("photo.jpg.txt".removesuffix(".txt")) == "photo"
    assert match_key("notes.v2") == "notes.v2"


# --- seed command -----------------------------------------------------------------------------


def test_seed_appends_drafts_only(tmp_path, monkeypatch, capsys):
    from loramill.captions.seed_edits import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "config").mkdir()
    (tmp_path / "config" / "config.yaml").write_text("datasets:\n  shapes: {}\n")
    results = tmp_path / "results" / "shapes"
    (results / "resized").mkdir(parents=True)
    write_jsonl(results / "auto_captions.jsonl", AUTO)
    sources = {
        "a.png": "images/a.jpg",
        "b.png": "images/b.png",
        "café photo.png": "images/café photo.webp",
    }
    manifest = {"images": [{"file": f, "source": s} for f, s in sources.items()]}
    (results / "resized" / "manifest.json").write_text(json.dumps(manifest))
    table = tmp_path / "data" / "shapes" / "metadata.csv"
    table.parent.mkdir(parents=True)
    table.write_bytes(
        b"filename,prompt,mode,image_sha256\r\nb.png,my own words,,bb"
    )  # no final newline

    assert main(["shapes"]) == 0
    before = b"filename,prompt,mode,image_sha256\r\nb.png,my own words,,bb"
    after = table.read_bytes()
    assert after.startswith(before)
    assert after[len(before) :].decode() == "\na.jpg,red circle,,aa\ncafé photo.webp,a cup,,cc\n"
    assert main(["shapes"]) == 0 and table.read_bytes() == after  # nothing new to add
    assert "0 row(s) added" in capsys.readouterr().out
    edits = read_edits(table, None)
    assert edits[match_key("a.png")] == Edit("red circle", "replace", "aa", "metadata.csv:3")
    assert main(["nope"]) == 1


@pytest.mark.parametrize(
    ("existing", "seeded"),
    [
        (None, b"filename,prompt,mode,image_sha256\nb.png,blue circle,,bb\n"),
        # Excel's "CSV UTF-8": the byte-order mark is no part of the first column's name
        (b"\xef\xbb\xbffilename,prompt\r\n", b"\xef\xbb\xbffilename,prompt\r\nb.png,blue circle\n"),
    ],
)
def test_seed_starts_a_table_or_appends_to_excels(tmp_path, existing, seeded):
    from loramill.captions.seed_edits import seed

    results = tmp_path / "results"
    (results / "resized").mkdir(parents=True)
    write_jsonl(results / "auto_captions.jsonl", AUTO[:1])
    manifest = {"images": [{"file": "b.png", "source": "images/b.png"}]}
    (results / "resized" / "manifest.json").write_text(json.dumps(manifest))
    (tmp_path / "ds").mkdir()
    if existing is not None:
        (tmp_path / "ds" / "metadata.csv").write_bytes(existing)
    assert seed(tmp_path / "ds", results) == 1
    assert (tmp_path / "ds" / "metadata.csv").read_bytes() == seeded


def test_make_seed_edits_runs_the_module(repo):
    import subprocess

    result = subprocess.run(
        ["make", "-n", "-o", ".venv/.installed", "seed-edits", "DS=shapes"],
        cwd=repo,
        capture_output=True,
        text=True,
        check=True,
    )
    assert ".venv/bin/python -m loramill.captions.seed_edits shapes" in result.stdout


def test_captions_over_the_text_encoders_limit_are_reported(ds, tiny_sd, caplog):
    long = ", ".join(f"tag{i}" for i in range(60))  # well over 75 CLIP tokens
    write_table(ds, f'a.png,"{long}",,')
    with caplog.at_level(logging.WARNING, logger="loramill"):
        _, report = merge(ds, base_model=tiny_sd)
    assert list(report["too_long"]) == ["a.png"] and report["too_long"]["a.png"] > 75
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"1 caption(s) exceed the text encoder's limit: a.png ({report['too_long']['a.png']})"
    ]


@pytest.mark.parametrize(("family", "limit"), [("flux", 511), ("chroma", 511)])
def test_flux_captions_are_counted_with_t5s_tokenizer(ds, tiny_flux, tiny_chroma, family, limit):
    """FLUX.1's captions reach the transformer through T5 (its second tokenizer), Chroma's
    through its only one: 512 tokens less T5's end token, not CLIP's 75."""
    model = {"flux": tiny_flux, "chroma": tiny_chroma}[family]
    medium = " ".join(["stripes"] * 200)  # over CLIP's 75, within T5's 511
    write_table(ds, f'a.png,"{medium}",,', f'b.png,"{medium} {medium} {medium}",,')
    _, report = merge(ds, base_model=str(model))
    assert list(report["too_long"]) == ["b.png"] and report["too_long"]["b.png"] > limit
