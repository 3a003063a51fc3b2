"""Validation loss (issue #32): which images are held out, that the number is the same across
runs and a resume, that an image's number does not depend on the others, and that the
export and the grid pick checkpoints by it."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import TRAIN_CONFIG, crash_and_resume, train, train_logged

from loramill import LoramillError
from loramill.files import read_jsonl, write_jsonl
from loramill.models.checkpoint import CHOICE_KEY, list_checkpoints, read_checkpoint
from loramill.train.config import TrainConfig
from loramill.train.data import Examples, held_out, read_examples, split, split_value
from loramill.train.ranking import best_checkpoint, lowest_steps, with_best_checkpoints
from loramill.train.validation import validate_checkpoints

SPLIT = {"validation_split": 0.4, "max_train_steps": 6, "save_steps": 2}


def random_hashes(count: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [f"{rnd.getrandbits(128):032x}" for _ in range(count)]


def test_the_split_is_decided_by_each_images_content_alone():
    hashes = random_hashes(400, 0)
    chosen = held_out(hashes, 0.2)
    assert 0.15 < sum(chosen) / len(chosen) < 0.25
    # images added, and some removed: every other image stays on its side
    grown = held_out(random_hashes(100, 1) + hashes[50:], 0.2)
    assert grown[100:] == chosen[50:]
    assert held_out(hashes, 0.0) == [False] * 400


def test_a_split_holds_out_at_least_one_image_and_refuses_to_hold_out_all():
    hashes = random_hashes(3, 2)
    chosen = held_out(hashes, 1e-9)
    lowest = min(hashes, key=split_value)
    assert chosen == [h == lowest for h in hashes]
    one = Examples([SimpleNamespace(name="a.png")], ["a"], [(8, 8)], 8, [1], [{}], [False])
    with pytest.raises(LoramillError, match="holds out all 1 images, and none is left"):
        split(one, 0.5, SimpleNamespace(file=lambda path: "x"))


def test_validate_every_n_steps_adds_checkpoint_steps():
    cfg = TrainConfig.from_dict({**TRAIN_CONFIG, "max_train_steps": 10, "save_steps": 4})
    assert cfg.checkpoint_steps == [4, 8, 10]
    cfg = TrainConfig.from_dict({**TRAIN_CONFIG, "max_train_steps": 10, "save_steps": 4,
                                 "validate_every_n_steps": 3})  # fmt: skip
    assert cfg.checkpoint_steps == [3, 4, 6, 8, 9, 10]


def validate(prepared, out, tiny_sd, config, captions=None, folder="", cache=None):
    return validate_checkpoints(
        out / "checkpoints", prepared / "resized", captions or prepared / "captions.jsonl",
        out / "validation.json", out / "validation.png", out / "tb-validation", tiny_sd,
        {**TRAIN_CONFIG, **config}, folder=folder, device="cpu",
        **({"cache_root": cache} if cache else {}),
    )  # fmt: skip


@pytest.fixture(scope="module")
def split_run(prepared, tiny_sd, tmp_path_factory):
    """A run of SPLIT, its validation measured twice (the second on the first's caches)."""
    out = tmp_path_factory.mktemp("split")
    written = train(prepared, out, tiny_sd, **SPLIT)
    first = validate(prepared, out, tiny_sd, SPLIT)
    again = validate(prepared, out, tiny_sd, SPLIT)
    return SimpleNamespace(out=out, written=written, first=first, again=again)


def test_training_leaves_the_held_out_images_out_and_validation_measures_them(split_run, prepared):
    examples = read_examples(prepared / "resized", prepared / "captions.jsonl")
    provenance = json.loads(read_checkpoint(split_run.written[-1]).metadata["loramill.provenance"])
    held = split_run.first["images"]
    assert 0 < len(held) < 5
    assert provenance["num_images"] == 5 - len(held)
    assert set(held) < {path.name for path in examples.images}
    assert [row["step"] for row in split_run.first["checkpoints"]] == [2, 4, 6]
    assert all(len(row["image_losses"]) == len(held) for row in split_run.first["checkpoints"])
    # the training loss since the checkpoint before, kept in each checkpoint's metadata
    assert all(row["train_loss"] > 0 for row in split_run.first["checkpoints"])
    saved = json.loads((split_run.out / "validation.json").read_text())
    assert saved["checkpoints"] == split_run.first["checkpoints"]
    assert saved["best"] == best_checkpoint(saved)


def test_validation_losses_are_identical_across_runs_and_a_resume(
    split_run, prepared, tiny_sd, tmp_path, caplog, monkeypatch
):
    assert split_run.again["checkpoints"] == split_run.first["checkpoints"]
    _, lines = crash_and_resume(prepared, tmp_path, tiny_sd, caplog, monkeypatch, SPLIT)
    assert "resumed from step 4" in lines
    resumed = validate(prepared, tmp_path / "resumed", tiny_sd, SPLIT)
    assert resumed["checkpoints"] == split_run.first["checkpoints"]


def test_another_validation_seed_draws_other_noise(split_run, prepared, tiny_sd, tmp_path):
    (tmp_path / "checkpoints").symlink_to(split_run.out / "checkpoints")
    other = validate(prepared, tmp_path, tiny_sd, {**SPLIT, "validation_seed": 1})
    assert other["seed"] == 1 and split_run.first["seed"] == TRAIN_CONFIG["seed"]
    assert other["checkpoints"][0]["loss"] != split_run.first["checkpoints"][0]["loss"]


def test_an_images_validation_loss_does_not_depend_on_the_other_images(
    plain_run, prepared, tiny_sd, tmp_path
):
    """A folder's images, all five and then three of them: the three's losses are equal (one
    image per batch, so no batch shape differs either)."""
    one = {"train_batch_size": 1}
    (tmp_path / "all" / "checkpoints").parent.mkdir()
    (tmp_path / "all" / "checkpoints").symlink_to(plain_run.folder / "checkpoints")
    every = validate(prepared, tmp_path / "all", tiny_sd, one, folder="v")
    records = read_jsonl(prepared / "captions.jsonl")
    write_jsonl(tmp_path / "three.jsonl", records[1:4])
    (tmp_path / "three").mkdir()
    (tmp_path / "three" / "checkpoints").symlink_to(plain_run.folder / "checkpoints")
    three = validate(prepared, tmp_path / "three", tiny_sd, one, tmp_path / "three.jsonl", "v")
    assert three["images"] == every["images"][1:4]
    for all_row, three_row in zip(every["checkpoints"], three["checkpoints"], strict=True):
        assert three_row["image_losses"] == all_row["image_losses"][1:4]


def test_an_adapter_without_up_weights_has_a_flat_validation_loss(
    plain_run, prepared, tiny_sd, tmp_path
):
    """The negative control: every checkpoint's up matrices zeroed, the LoRA adds nothing,
    and every checkpoint measures the same; trained, they differ."""
    from safetensors.torch import save_file

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for path in list_checkpoints(plain_run.folder / "checkpoints"):
        checkpoint = read_checkpoint(path)
        tensors = {k: torch.zeros_like(v) if ".lora_B." in k else v
                   for k, v in checkpoint.tensors.items()}  # fmt: skip
        save_file(tensors, folder / path.name, metadata=checkpoint.metadata)
    zeroed = validate(prepared, tmp_path, tiny_sd, {}, folder="v")
    assert len({row["loss"] for row in zeroed["checkpoints"]}) == 1
    (tmp_path / "trained" / "checkpoints").parent.mkdir()
    (tmp_path / "trained" / "checkpoints").symlink_to(plain_run.folder / "checkpoints")
    trained = validate(prepared, tmp_path / "trained", tiny_sd, {}, folder="v")
    assert len({row["loss"] for row in trained["checkpoints"]}) == 2


def test_validation_without_images_is_refused(plain_run, prepared, tiny_sd, tmp_path):
    (tmp_path / "checkpoints").symlink_to(plain_run.folder / "checkpoints")
    with pytest.raises(LoramillError, match=r"no validation images; set train\.validation_split"):
        validate(prepared, tmp_path, tiny_sd, {})


RESULT = {
    "source": "train.validation_split 0.4",
    "images": ["a.png"],
    "checkpoints": [
        {"step": 2, "file": "step-000002.safetensors", "loss": 0.30, "train_loss": 0.2},
        {"step": 4, "file": "step-000004.safetensors", "loss": 0.10, "train_loss": 0.2},
        {"step": 6, "file": "step-000006.safetensors", "loss": 0.20, "train_loss": 0.1},
    ],
}


def test_the_best_checkpoints_are_those_of_lowest_validation_loss():
    assert best_checkpoint(RESULT) == {"step": 4, "file": "step-000004.safetensors", "loss": 0.1}
    assert lowest_steps(RESULT, 2) == [4, 6]
    assert lowest_steps(RESULT, 9) == [2, 4, 6]
    assert with_best_checkpoints({"checkpoints": "all"}, None) == {"checkpoints": "all"}
    with pytest.raises(LoramillError, match=r"best:2 needs results/<ds>/validation\.json"):
        with_best_checkpoints({"checkpoints": "best:2"}, None)


def test_the_grid_draws_the_best_checkpoints(tmp_path):
    from loramill.grid.plan import select_checkpoints

    (tmp_path / "v.json").write_text(json.dumps(RESULT))
    settings = with_best_checkpoints({"checkpoints": "best:2"}, str(tmp_path / "v.json"))
    assert select_checkpoints(settings["checkpoints"], [2, 4, 6]) == [4, 6]


def test_the_export_ships_the_best_checkpoint_when_asked_and_says_so(split_run, tiny_sd, tmp_path):
    from loramill.export.job import export_and_verify

    result = {**split_run.first, "checkpoints": [dict(r) for r in split_run.first["checkpoints"]]}
    result["checkpoints"][0]["loss"] = 0.0  # step 2 the best, whatever was measured
    (tmp_path / "v.json").write_text(json.dumps(result))
    out = tmp_path / "exports"
    paths = [out / "x.safetensors", out / "x.diffusers.safetensors", out / "x.md", out / "s"]
    export_and_verify(split_run.out / "checkpoints", *paths, "x", {"save_precision": "fp32",
                      "checkpoint": "best"}, tiny_sd, False, {**TRAIN_CONFIG, **SPLIT},
                      validation_json=tmp_path / "v.json")  # fmt: skip
    metadata = read_checkpoint(paths[0]).metadata
    assert metadata["loramill.step"] == "2"
    assert json.loads(metadata[CHOICE_KEY]) == {
        "checkpoint": "best", "step": 2, "validation_loss": 0.0,
        "validation": "train.validation_split 0.4",
    }  # fmt: skip
    assert read_checkpoint(paths[1]).metadata["loramill.step"] == "2"
    card = paths[2].read_text()
    assert "## Validation" in card and "| 2 (this file) | 0.000000 |" in card
    assert len(sorted(paths[3].iterdir())) == 3  # every step's file still


def test_the_held_out_images_are_named_in_the_training_log(prepared, tiny_sd, tmp_path, caplog):
    _, lines = train_logged(prepared, tmp_path, tiny_sd, caplog, {**SPLIT, "max_train_steps": 1})
    held = [line for line in lines if line.startswith("validation_split 0.4: ")]
    assert held and held[0].endswith("of 5 images held out for validation")


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_sdxl_validation_is_identical_across_runs_in_either_precision(
    prepared, tiny_sdxl, tmp_path, precision
):
    """SDXL's size conditions and two text encoders, the masked loss, bf16 autocast: the same
    numbers from two validations of the same checkpoints."""
    config = {**SPLIT, "max_train_steps": 2, "save_steps": 1, "masked_loss": True,
              "alpha_mask": True, "mixed_precision": precision}  # fmt: skip
    train(prepared, tmp_path, str(tiny_sdxl), **config)
    first = validate(prepared, tmp_path, str(tiny_sdxl), config)
    again = validate(prepared, tmp_path, str(tiny_sdxl), config)
    assert [row["step"] for row in first["checkpoints"]] == [1, 2]
    assert again["checkpoints"] == first["checkpoints"]
    assert first["checkpoints"][0]["loss"] != first["checkpoints"][1]["loss"]
