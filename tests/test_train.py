"""Training: LoRA actually learns, checkpoints land where configured, and runs reproduce."""

from __future__ import annotations

import json

import pytest
import torch

from loramill import LoramillError
from loramill.demo_data import generate_dataset
from loramill.files import write_jsonl
from loramill.lora import list_checkpoints, read_checkpoint
from loramill.merge import merge_captions
from loramill.resize import resize_dataset
from loramill.train import checkpoint_steps, train_lora

CONFIG = {
    "rank": 4,
    "alpha": 2,
    "learning_rate": 1e-3,
    "max_train_steps": 6,
    "save_steps": 4,
    "train_batch_size": 2,
    "seed": 3,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    generate_dataset(root / "ds", "stripes", 5)
    manifest = resize_dataset(root / "ds" / "images", root / "resized", 32)
    auto = [{"image": e["file"], "caption": e["file"][:-4]} for e in manifest["images"]]
    write_jsonl(root / "auto.jsonl", auto)
    merge_captions(root / "auto.jsonl", None, root / "captions.jsonl", root / "r.json", "zzt")
    return root


def train(prepared, out, tiny_sd, **overrides):
    return train_lora(
        prepared / "resized",
        prepared / "captions.jsonl",
        out / "checkpoints",
        out / "tb",
        tiny_sd,
        {**CONFIG, **overrides},
        dataset="ds",
        trigger="zzt",
    )


def test_checkpoint_steps():
    assert checkpoint_steps(6, 4) == [4, 6]
    assert checkpoint_steps(40, 20) == [20, 40]
    assert checkpoint_steps(5, 10) == [5]


def test_training_writes_checkpoints_that_moved_away_from_zero(prepared, tmp_path, tiny_sd):
    written = train(prepared, tmp_path, tiny_sd)
    assert [p.name for p in written] == ["step-000004.safetensors", "step-000006.safetensors"]
    assert list_checkpoints(tmp_path / "checkpoints") == written
    final = read_checkpoint(written[-1])
    up = [t for k, t in final.tensors.items() if "lora_B" in k]
    assert up and all(k.startswith("unet.") for k in final.tensors)
    # peft starts lora_B at zero: a trained adapter has moved it.
    assert all(t.abs().sum() > 0 for t in up)
    assert (final.rank, final.alpha, final.metadata["loramill.step"]) == (4, 2.0, "6")
    record = json.loads(final.metadata["loramill.provenance"])
    assert record["train_config"]["learning_rate"] == 1e-3
    assert record["num_images"] == 5 and record["tag_frequency"]["zzt"] == 5
    assert len(record["base_model_hash"]) == 64 and ":" in record["data_fingerprint"]
    assert record["versions"]["torch"].startswith("2.13")
    events = list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert events


def test_same_inputs_and_config_give_bit_identical_adapters(prepared, tmp_path, tiny_sd):
    first = train(prepared, tmp_path / "a", tiny_sd, train_text_encoder=True)
    second = train(prepared, tmp_path / "b", tiny_sd, train_text_encoder=True)
    assert [p.read_bytes() for p in first] == [p.read_bytes() for p in second]
    assert any(k.startswith("text_encoder.") for k in read_checkpoint(first[-1]).tensors)
    other_seed = train(prepared, tmp_path / "c", tiny_sd, train_text_encoder=True, seed=4)
    assert other_seed[-1].read_bytes() != first[-1].read_bytes()


def test_learning_rate_changes_the_result(prepared, tmp_path, tiny_sd):
    slow = read_checkpoint(train(prepared, tmp_path / "a", tiny_sd, max_train_steps=2)[-1])
    fast = read_checkpoint(
        train(prepared, tmp_path / "b", tiny_sd, max_train_steps=2, learning_rate=1e-2)[-1]
    )
    assert any(not torch.equal(slow.tensors[k], fast.tensors[k]) for k in slow.tensors)


def test_unknown_option_is_named(prepared, tmp_path, tiny_sd):
    with pytest.raises(LoramillError, match=r"^train\.epochs: unknown option$"):
        train(prepared, tmp_path, tiny_sd, epochs=3)
