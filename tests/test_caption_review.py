"""Caption review in the browser (issue #34), its server and the file it writes: the rows a
save does not change stay byte for byte and in order, a file changed on disk since the page
read it is never overwritten, every request needs the token, nothing but metadata.csv is ever
written, and whatever the page saves merges as the same edits written by hand would."""

from __future__ import annotations

import csv
import io
import json
import os
import string
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from review_fixtures import MERGE, TOKEN, review_dataset

from loramill import files as files_module
from loramill.captions.edits import read_edits
from loramill.captions.merge import merge_captions, merged_captions
from loramill.captions.review import table as table_module
from loramill.captions.review.server import create_app
from loramill.captions.review.table import Change, Conflict, Table
from loramill.files import read_jsonl

HEADERS = {"X-Loramill-Token": TOKEN}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One dataset, resized and auto-captioned once; each test works on a copy of its edits."""
    return review_dataset(tmp_path_factory.mktemp("review"))


@pytest.fixture
def dataset(built):
    table = built.root / "metadata.csv"
    table.unlink(missing_ok=True)
    yield built
    table.unlink(missing_ok=True)


@pytest.fixture
def client(dataset):
    return create_app(dataset, TOKEN).test_client()


def state(client) -> dict:
    response = client.get("/api/state", headers=HEADERS)
    assert response.status_code == 200, response.get_json()
    return response.get_json()


def save(client, version: str, changes: dict):
    return client.post("/api/save", headers=HEADERS, json={"version": version, "changes": changes})


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` with its bytes and modification time."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_the_state_shows_each_image_with_the_caption_training_will_use(client, dataset):
    shown = state(client)
    assert shown["version"] == "absent" and len(shown["images"]) == 6
    odd = next(row for row in shown["images"] if "blurry" in row["auto"])
    # the merge stage's rules: the trigger first, blurry removed, 1girl replaced
    assert odd["training"].startswith("zzt, stripes, band ")
    assert "blurry" not in odd["training"] and odd["training"].endswith("one girl")
    assert odd["edit"] is None and odd["bucket"] and odd["name"].startswith(odd["image"][:-4])
    image = shown["images"][0]["image"]
    thumbnail = client.get(f"/thumbnail/{image}", headers=HEADERS)
    assert thumbnail.status_code == 200 and thumbnail.data[:3] == b"\xff\xd8\xff"  # a JPEG
    page = client.get(f"/?token={TOKEN}")
    assert page.status_code == 200 and b"/assets/review.js?token=" + TOKEN.encode() in page.data


def test_saving_keeps_every_row_it_does_not_change_byte_for_byte(client, dataset):
    images = [row["name"] for row in state(client)["images"]]
    others = [
        '\ufefffilename,prompt,mode,image_sha256\r\n',
        f'{images[0]},"a quoted, ""first"" caption",,\r\n',
        '\r\n',
        f'{images[1]},"a caption over\r\ntwo lines",append,\r\n',
        f'{images[2]},  spaced   out  ,prepend,\r\n',
        f'{images[3]},to be removed,,\r\n',
        'not_an_image.png,an orphaned row stays,,',  # no line end at the end of the file
    ]  # fmt: skip
    path = dataset.root / "metadata.csv"
    path.write_bytes("".join(others).encode())
    version = state(client)["version"]
    resized = {row["name"]: row["image"] for row in state(client)["images"]}
    changes = {
        resized[images[1]]: {"prompt": "changed, in the page", "mode": "prepend"},
        resized[images[3]]: None,
        resized[images[4]]: {"prompt": "a new row", "mode": "replace"},
    }
    response = save(client, version, changes)
    assert response.status_code == 200, response.get_json()
    text = path.read_bytes().decode()
    changed = f'{images[1]},"changed, in the page",prepend,{sha_of(client, images[1])}\r\n'
    added = f"{images[4]},a new row,replace,{sha_of(client, images[4])}\r\n"
    assert text == "".join([*others[:3], changed, others[4], others[6] + "\r\n", added])
    assert response.get_json()["version"] == state(client)["version"] != version


def sha_of(client, name: str) -> str:
    return next(r["sha256"] for r in state(client)["images"] if r["name"] == name)


def test_a_file_changed_on_disk_since_the_page_read_it_is_not_overwritten(client, dataset):
    image = state(client)["images"][0]["image"]
    version = state(client)["version"]
    path = dataset.root / "metadata.csv"
    path.write_text("filename,prompt\nsomething.png,written in a text editor\n")  # meanwhile
    before = path.read_bytes()
    response = save(client, version, {image: {"prompt": "from the page", "mode": "replace"}})
    assert response.status_code == 409
    assert "changed on disk since the page read it" in response.get_json()["error"]
    assert path.read_bytes() == before
    again = save(client, state(client)["version"], {image: {"prompt": "from the page"}})
    assert again.status_code == 200
    assert path.read_text().startswith("filename,prompt\nsomething.png,written in a text editor\n")


def test_every_request_needs_the_token(client):
    image = state(client)["images"][0]["image"]
    for url in ("/", "/api/state", f"/thumbnail/{image}", "/assets/review.js"):
        assert client.get(url).status_code == 403, url
        assert client.get(url, headers={"X-Loramill-Token": "guess"}).status_code == 403, url
        assert client.get(f"{url}?token={TOKEN}").status_code == 200, url
    assert client.post("/api/save", json={"version": "absent", "changes": {}}).status_code == 403


def test_paths_outside_the_dataset_and_bad_edits_are_refused(client, dataset, tmp_path):
    path = dataset.root / "metadata.csv"
    for url in ("/thumbnail/../../data/bands/images", "/thumbnail/%2e%2e/manifest.json",
                "/assets/..%2Ftable.py", "/assets/index.html"):  # fmt: skip
        assert client.get(url, headers=HEADERS).status_code == 404, url
    image = state(client)["images"][0]["image"]
    refused = {
        "../../etc/passwd": {"prompt": "x"},
        image: {"prompt": "", "mode": "replace"},
    }
    for name, change in refused.items():
        response = save(client, "absent", {name: change})
        assert response.status_code == 400 and response.get_json()["error"], name
    assert not path.exists()
    sidecars = dataset.root / "captions"
    sidecars.mkdir()
    (sidecars / f"{Path(image).stem}.txt").write_text("a sidecar edit\n")
    try:
        response = save(client, "absent", {image: {"prompt": "x"}})
        assert response.get_json()["error"].endswith("change it there")
    finally:
        (sidecars / f"{Path(image).stem}.txt").unlink()
        sidecars.rmdir()


def test_a_mode_the_table_has_no_column_for_is_refused_naming_the_fix(client, dataset):
    path = dataset.root / "metadata.csv"
    path.write_text("filename,prompt\n")
    image = state(client)["images"][0]["image"]
    response = save(client, state(client)["version"], {image: {"prompt": "x", "mode": "append"}})
    assert response.status_code == 400
    assert "no mode column" in response.get_json()["error"]
    assert path.read_text() == "filename,prompt\n"


def test_only_metadata_csv_is_ever_written(client, dataset, monkeypatch):
    """Saves, atomically and then in place where the folder may not be written: data/ holds
    the same files, byte for byte and untouched, but metadata.csv."""
    before = snapshot(dataset.root.parent)
    images = [row["image"] for row in state(client)["images"]]
    assert save(client, "absent", {images[0]: {"prompt": "one"}}).status_code == 200
    assert save(client, state(client)["version"], {images[1]: None}).status_code == 200

    def read_only_folder(*args, **kwargs):
        raise PermissionError("read-only folder")

    if os.geteuid():  # the dataset's folder read-only, as a user may keep it
        os.chmod(dataset.root, 0o555)
    else:  # root writes into any folder: creating the temporary file is refused instead
        monkeypatch.setattr(files_module.tempfile, "mkstemp", read_only_folder)
    try:
        response = save(client, state(client)["version"], {images[2]: {"prompt": "two"}})
    finally:
        os.chmod(dataset.root, 0o755)
    assert response.status_code == 200
    after = snapshot(dataset.root.parent)
    assert sorted(after) == sorted([*before, "bands/metadata.csv"])
    assert all(after[name] == seen for name, seen in before.items())
    assert "two" in (dataset.root / "metadata.csv").read_text()


def test_the_page_shows_the_training_caption_the_merge_stage_writes(client, dataset, tmp_path):
    images = [row["image"] for row in state(client)["images"]]
    changes = {images[0]: {"prompt": "a, blurry, 1girl", "mode": "replace"},
               images[1]: {"prompt": "wide", "mode": "append"},
               images[2]: {"prompt": "", "mode": "exclude"}}  # fmt: skip
    preview = client.post("/api/preview", headers=HEADERS,
                          json={"image": images[0], **changes[images[0]]})  # fmt: skip
    assert preview.get_json()["training"] == "zzt, a, one girl"
    shown = save(client, "absent", changes).get_json()
    out = tmp_path / "captions.jsonl"
    merge_captions(dataset.results / "auto_captions.jsonl", None, out, tmp_path / "r.json",
                   ["zzt"], metadata_csv=dataset.root / "metadata.csv", settings=MERGE)  # fmt: skip
    merged = {r["image"]: r["caption"] for r in read_jsonl(out)}
    assert {r["image"]: r["training"] for r in shown["images"] if r["training"]} == merged
    assert images[2] not in merged


# --- any page edits, saved and reloaded, merge as the same edits written by hand ------------

WORDS = st.text(alphabet=string.ascii_lowercase + " ,\"'é\n", min_size=0, max_size=12)
EDIT = st.one_of(st.none(), st.fixed_dictionaries({
    "prompt": WORDS, "mode": st.sampled_from(["replace", "prepend", "append", "exclude"]),
}))  # fmt: skip
SAVES = st.lists(st.dictionaries(st.integers(0, 5), EDIT, max_size=4), min_size=1, max_size=4)


def by_hand(images: list[dict], model: dict[str, dict]) -> str:
    """metadata.csv as a person would write these edits."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["filename", "prompt", "mode"])
    for row in images:
        edit = model.get(row["image"])
        if edit is not None:
            writer.writerow([row["name"], edit["prompt"], edit["mode"]])
    return out.getvalue()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(saves=SAVES)
def test_any_page_edits_merge_as_the_same_hand_edits(built, saves, tmp_path):
    path = built.root / "metadata.csv"
    path.unlink(missing_ok=True)
    client = create_app(built, TOKEN).test_client()
    images = state(client)["images"]
    model: dict[str, dict] = {}
    for changes in saves:
        request = {images[i]["image"]: edit for i, edit in changes.items()}
        response = save(client, state(client)["version"], request)
        valid = all(e is None or " ".join(e["prompt"].split()) or e["mode"] == "exclude"
                    for e in request.values())  # fmt: skip
        assert (response.status_code == 200) == valid, response.get_json()
        for image, edit in request.items() if valid else ():
            model[image] = None if edit is None else {
                "prompt": " ".join(edit["prompt"].split()), "mode": edit["mode"]}  # fmt: skip
    hand = tmp_path / "hand" / "metadata.csv"
    hand.parent.mkdir(exist_ok=True)
    hand.write_text(by_hand(images, model))
    auto = read_jsonl(built.results / "auto_captions.jsonl")
    page_result = merged_captions(auto, read_edits(path, None), built.rules)
    hand_result = merged_captions(auto, read_edits(hand, None), built.rules)
    assert page_result.records == hand_result.records
    assert page_result.excluded == hand_result.excluded
    shown = {r["image"]: r["training"] for r in state(client)["images"]}
    assert {r["image"]: r["caption"] for r in page_result.records} == {
        image: caption for image, caption in shown.items() if caption is not None
    }
    path.unlink(missing_ok=True)


def test_table_parses_what_it_read(tmp_path):
    """Table's record splitting on the csv module's own quoting: a row over several lines."""
    path = tmp_path / "metadata.csv"
    path.write_text('filename,prompt\na.png,"x\ny"\nc.png,a\u2028line separator\nb.png,z\n',
                    newline="")  # fmt: skip
    table = Table(path)
    kept = ['a.png,"x\ny"\n', "c.png,a\u2028line separator\n"]
    assert [raw for raw, _ in table.rows] == [*kept, "b.png,z\n"]
    assert table.changed([Change("b", "new")]) == "".join(["filename,prompt\n", *kept,
                                                           "b.png,new\n"])  # fmt: skip
    assert json.loads(json.dumps(table.header)) == ["filename", "prompt"]
    assert os.path.exists(path)


def test_bad_requests_and_an_unreadable_table_get_a_message_not_a_crash(client, dataset):
    image = state(client)["images"][0]["image"]
    null_prompt = {image: {"prompt": None, "mode": "replace"}}
    for body in ({"changes": {}}, {"version": "absent", "changes": [image]},
                 {"version": "absent", "changes": {image: "text"}},
                 {"version": "absent", "changes": null_prompt}):  # fmt: skip
        response = client.post("/api/save", headers=HEADERS, json=body)
        assert response.status_code == 400 and response.get_json()["error"], body
    assert not (dataset.root / "metadata.csv").exists()
    assert client.post("/api/preview", headers=HEADERS, json={"image": image}).status_code == 400
    path = dataset.root / "metadata.csv"
    for content, where in ((b'filename,prompt\na.png,"unclosed\n', ":2: "),
                           (b"filename,prompt\na.png,caf\xe9\n", ":2: not UTF-8")):  # fmt: skip
        path.write_bytes(content)
        for response in (client.get("/api/state", headers=HEADERS),
                         save(client, "absent", {image: {"prompt": "x"}})):  # fmt: skip
            assert response.status_code == 400
            assert f"metadata.csv{where}" in response.get_json()["error"]
        assert path.read_bytes() == content


def test_a_new_table_gets_the_permissions_the_umask_gives(client, dataset):
    image = state(client)["images"][0]["image"]
    mask = os.umask(0o022)
    try:
        assert save(client, "absent", {image: {"prompt": "x"}}).status_code == 200
    finally:
        os.umask(mask)
    assert (dataset.root / "metadata.csv").stat().st_mode & 0o777 == 0o644


def test_a_link_in_a_read_only_folder_is_not_written_through(client, dataset, monkeypatch):
    """Where the folder may not be written the table is overwritten in place, but never
    through a link: DVC links its cache's file there, and that copy must not change."""
    cached = dataset.root.parent / "cache-copy.csv"
    cached.write_text("filename,prompt\n")
    path = dataset.root / "metadata.csv"
    os.link(cached, path)

    def read_only_folder(*args, **kwargs):
        raise PermissionError("read-only folder")

    monkeypatch.setattr(files_module.tempfile, "mkstemp", read_only_folder)
    try:
        image = state(client)["images"][0]["image"]
        response = save(client, state(client)["version"], {image: {"prompt": "x"}})
        assert response.status_code == 400
        assert "a link (into DVC's cache?)" in response.get_json()["error"]
        assert cached.read_text() == path.read_text() == "filename,prompt\n"
    finally:
        cached.unlink()


def test_a_table_that_changes_while_it_is_read_is_refused(tmp_path, monkeypatch):
    """The version is the hash of the first read, the rows come from the second: were they
    different files, a save could pass the version check and rewrite rows never shown."""
    path = tmp_path / "metadata.csv"
    path.write_text("filename,prompt\na.png,x\n")
    monkeypatch.setattr(table_module, "decode", lambda _: "filename,prompt\na.png,y\n")
    with pytest.raises(Conflict, match="changed while it was read"):
        Table(path)


def test_a_broken_manifest_and_an_unknown_mode_get_one_line(client, dataset):
    image = state(client)["images"][0]["image"]
    response = client.post("/api/preview", headers=HEADERS,
                           json={"image": image, "prompt": "x", "mode": "bogus"})  # fmt: skip
    assert response.status_code == 400
    assert response.get_json()["error"] == "mode: 'bogus': one of replace, prepend, append, exclude"
    manifest = dataset.results / "resized" / "manifest.json"
    kept = manifest.read_bytes()
    try:
        for broken in (b'{"images": [', b'{"files": []}'):
            manifest.write_bytes(broken)
            response = client.get("/api/state", headers=HEADERS)
            assert response.status_code == 400
            assert response.get_json()["error"] == (
                f"{manifest}: not the resize stage's manifest; run it again"
            )
    finally:
        manifest.write_bytes(kept)
