"""kohya sd-scripts' DreamBooth folders: ``images/<repeats>_<concept>/`` is read, each image
repeated that many times per epoch and captioned with the concept when the captioner has
nothing better; every other subfolder stays quarantined, saying how to express repeats."""

from __future__ import annotations

import json
from collections import Counter

import torch
from conftest import TRAIN_CONFIG
from PIL import Image

from loramill.captions.autocaption import caption_dataset
from loramill.captions.backends import CAPTIONERS, Captioner
from loramill.captions.merge import merge_captions
from loramill.captions.seed_edits import drafts
from loramill.dataset_files import folder_hashes
from loramill.files import read_jsonl
from loramill.hashing import HashCache
from loramill.prepare.buckets import batches, batches_per_epoch
from loramill.prepare.resize import SUBFOLDER, resize_dataset
from loramill.train.data import read_examples

SETTINGS = {"resolution": 16, "enable_bucket": False}
INSIDE = ("one.png", "two.jpg", "nested")  # what the repeats folder holds


def make(path, colour):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 24), colour).save(path)


def kohya_dataset(root, folder="3_sks dog"):
    """Two plain images, two in a repeats folder, and folders that are not read."""
    images = root / "ds" / "images"
    make(images / "plain_a.png", (200, 0, 0))
    make(images / "plain_b.png", (0, 200, 0))
    make(images / folder / "one.png", (0, 0, 200))
    make(images / folder / "two.jpg", (200, 200, 0))
    make(images / folder / "nested" / "deep.png", (1, 2, 3))
    make(images / "other" / "x.png", (4, 5, 6))
    make(images / "0_never" / "y.png", (7, 8, 9))
    return images


def resize(root, images):
    return resize_dataset(images, root / "resized", SETTINGS, cache_dir=root / "cache")


def test_repeats_folders_are_read_and_other_subfolders_say_how_to_repeat(tmp_path):
    manifest = resize(tmp_path, kohya_dataset(tmp_path))
    read = {
        e["source"]: (e["file"], e.get("repeats"), e.get("concept")) for e in manifest["images"]
    }
    assert read == {
        "images/plain_a.png": ("plain_a.png", None, None),
        "images/plain_b.png": ("plain_b.png", None, None),
        "images/3_sks dog/one.png": ("sks dog__one.png", 3, "sks dog"),
        "images/3_sks dog/two.jpg": ("sks dog__two.png", 3, "sks dog"),
    }
    resized = {p.name for p in (tmp_path / "resized").iterdir()}
    assert resized == {e["file"] for e in manifest["images"]} | {"manifest.json"}
    reasons = {q["source"]: q["reason"] for q in manifest["quarantined"]}
    assert reasons == {
        "images/0_never": SUBFOLDER,
        "images/other": SUBFOLDER,
        "images/3_sks dog/nested": SUBFOLDER,
    }
    assert "<repeats>_<concept>" in SUBFOLDER and "train.repeats" in SUBFOLDER


def test_a_repeats_folders_name_cannot_collide_with_a_plain_image(tmp_path):
    images = tmp_path / "ds" / "images"
    make(images / "1_cat" / "a.png", (10, 10, 10))
    make(images / "cat__a.png", (20, 20, 20))
    manifest = resize(tmp_path, images)
    assert [e["source"] for e in manifest["images"]] == ["images/1_cat/a.png"]
    assert manifest["quarantined"] == [
        {
            "source": "images/cat__a.png",
            "reason": "resized as cat__a.png, like images/1_cat/a.png (outputs and captions "
            "are matched by name): rename one",
        }
    ]


def test_renaming_to_another_repeat_count_changes_the_fingerprint_not_the_names(tmp_path):
    images = kohya_dataset(tmp_path)
    before = folder_hashes(images, "images", HashCache())
    assert "3_sks dog/one.png" in before and "other/x.png" not in before
    first = resize(tmp_path, images)
    (images / "3_sks dog").rename(images / "10_sks dog")
    after = folder_hashes(images, "images", HashCache())
    assert after != before and "10_sks dog/one.png" in after
    # the rename counts once per entry it moved ("3 added, 3 removed"), not the folder too
    assert set(before) ^ set(after) == {f"{n}_sks dog/{f}" for n in (3, 10) for f in INSIDE}
    second = resize(tmp_path, images)
    names = lambda manifest: sorted(e["file"] for e in manifest["images"])  # noqa: E731
    assert names(second) == names(first)  # caption edits keep matching
    assert {e.get("repeats") for e in second["images"]} == {None, 10}


def test_the_concept_is_the_caption_unless_a_model_captions_the_image(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    resize(tmp_path, kohya_dataset(tmp_path))
    auto = tmp_path / "auto.jsonl"
    caption_dataset(tmp_path / "resized", auto, {"template": "{words}"}, "ds", "zzt")
    captions = {r["image"]: (r["caption"], r["source"]) for r in read_jsonl(auto)}
    assert captions == {
        "plain_a.png": ("plain a", "template"),
        "plain_b.png": ("plain b", "template"),
        "sks dog__one.png": ("sks dog", "folder"),
        "sks dog__two.png": ("sks dog", "folder"),
    }
    merge_captions(auto, None, tmp_path / "captions.jsonl", tmp_path / "report.json", "zzt")
    trained = {r["image"]: r["caption"] for r in read_jsonl(tmp_path / "captions.jsonl")}
    assert trained["sks dog__one.png"] == "zzt, sks dog"

    class Looks(Captioner):  # a backend that sees the image: blip, clip, vlm, wd14
        name = "looks"

        @classmethod
        def from_config(cls, config, context):
            return cls()

        def caption(self, images):
            return ["" if "two" in name else "a blue photo" for name, _ in images]

    monkeypatch.setitem(CAPTIONERS, "looks", Looks)
    caption_dataset(tmp_path / "resized", auto, {"backend": "looks"}, "ds", "zzt")
    captions = {r["image"]: r["caption"] for r in read_jsonl(auto)}
    assert captions["sks dog__one.png"] == "a blue photo"  # kohya: a caption file wins
    assert captions["sks dog__two.png"] == "sks dog"  # no caption: the folder's tokens
    assert captions["plain_b.png"] == "a blue photo"


def test_the_sampler_repeats_each_image_by_its_folder(tmp_path):
    manifest = resize(tmp_path, kohya_dataset(tmp_path))
    records = [{"image": e["file"], "caption": e["file"]} for e in manifest["images"]]
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    examples = read_examples(tmp_path / "resized", tmp_path / "captions.jsonl")
    names = [path.name for path in examples.images]
    # train.repeats multiplies the folder's count
    times = dict(zip(names, examples.times(2), strict=True))
    assert times == {
        "plain_a.png": 2,
        "plain_b.png": 2,
        "sks dog__one.png": 6,
        "sks dog__two.png": 6,
    }
    epoch = batches(examples.buckets, 2, torch.Generator().manual_seed(0), examples.times(1))
    drawn = Counter(names[i] for batch in epoch for i in batch)
    assert drawn == {
        "plain_a.png": 1,
        "plain_b.png": 1,
        "sks dog__one.png": 3,
        "sks dog__two.png": 3,
    }
    assert len(epoch) == batches_per_epoch(examples.buckets, 2, examples.times(1)) == 4


def test_training_draws_repeats_folder_images_that_many_times(tmp_path, tiny_sd, monkeypatch):
    import loramill.train.step
    from loramill.train.loop import train_lora

    monkeypatch.chdir(tmp_path)
    resize(tmp_path, kohya_dataset(tmp_path))
    auto = tmp_path / "auto.jsonl"
    caption_dataset(tmp_path / "resized", auto, {"template": "{words}"}, "ds", "zzt")
    merge_captions(auto, None, tmp_path / "captions.jsonl", tmp_path / "report.json", "zzt")
    epochs = []

    def spy(*args, **kwargs):
        epoch = batches(*args, **kwargs)
        epochs.append([list(batch) for batch in epoch])  # training pops from its own
        return epoch

    monkeypatch.setattr(loramill.train.step, "batches", spy)
    config = {**TRAIN_CONFIG, "max_train_epochs": 1, "max_train_steps": 1000, "save_steps": 100}
    paths = [tmp_path / name for name in ("resized", "captions.jsonl", "ckpt", "tb")]
    written = train_lora(*paths, tiny_sd, config, trigger="zzt")
    # 2 plain images once, 2 folder images 3 times: 8 draws, 4 batches of 2, one epoch
    assert [p.name for p in written] == ["step-000004.safetensors"]
    assert len(epochs) == 1 and sum(len(batch) for batch in epochs[0]) == 8


def test_seeded_edits_name_a_folder_image_by_its_resized_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    results = tmp_path / "results"
    resize_dataset(
        kohya_dataset(tmp_path), results / "resized", SETTINGS, cache_dir=tmp_path / "cache"
    )
    caption_dataset(results / "resized", results / "auto_captions.jsonl", {}, "ds", "zzt")
    names = sorted(row["filename"] for row in drafts(results))
    assert names == ["plain_a.png", "plain_b.png", "sks dog__one.png", "sks dog__two.png"]
