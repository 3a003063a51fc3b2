"""Samples during training: kohya prompt options, files beside the checkpoints and in
TensorBoard, the same pixels every run, restored on resume, and no effect on the adapter."""

from __future__ import annotations

import pytest
import torch
import yaml
from conftest import REPO, crash_and_resume, digest, train_logged, train_recorded
from PIL import Image

from loramill import LoramillError
from loramill.models.checkpoint import read_checkpoint
from loramill.models.samplers import SAMPLERS
from loramill.train.config import TrainConfig
from loramill.train.samples import SamplePrompt, parse_sample_prompt

DEFAULT = SamplePrompt("", "", 64, 64, seed=5, guidance_scale=7.5, steps=20)
SAMPLES = {"sample_every_n_steps": 2, "sample_steps": 2}
SAMPLES["sample_prompts"] = ["{trigger} stripes --w 32 --h 48 --d 9", "plain --n {trigger}"]


def test_kohya_prompt_options():
    line = "a zzt cat, red --n blurry, dark --w 512 --h 768 --d 7 --l 5.5 --s 28"
    assert parse_sample_prompt(line, DEFAULT) == SamplePrompt(
        "a zzt cat, red", "blurry, dark", 512, 768, seed=7, guidance_scale=5.5, steps=28
    )
    assert parse_sample_prompt("just words", DEFAULT) == SamplePrompt("just words", *[
        "", 64, 64, 5, 7.5, 20]
    )  # fmt: skip
    with pytest.raises(LoramillError, match=r"^train\.sample_prompts 'x --q 3': unknown option"):
        parse_sample_prompt("x --q 3", DEFAULT)
    with pytest.raises(LoramillError, match=r"--w needs a int, not 'wide'"):
        parse_sample_prompt("x --w wide", DEFAULT)
    with pytest.raises(LoramillError, match=r"multiples of 8"):
        parse_sample_prompt("x --w 30", DEFAULT)


def test_sample_options_need_sample_every_n_steps():
    with pytest.raises(
        LoramillError,
        match=r"^train\.sample_steps: 5 has no effect with train\.sample_every_n_steps: 0",
    ):
        TrainConfig(sample_steps=5).check()
    TrainConfig(sample_every_n_steps=10, sample_steps=5).check()


def test_schema_offers_the_samplers_there_are():
    schema = yaml.safe_load((REPO / "config" / "config.schema.yaml").read_text())
    assert schema["$defs"]["train"]["properties"]["sample_sampler"]["enum"] == list(SAMPLERS)


@pytest.fixture(scope="module")
def sampled(prepared, tiny_sd, tmp_path_factory):
    """TRAIN_CONFIG with samples every 2 steps, trained once: the run the resumed one and the
    rerun must match."""
    out = tmp_path_factory.mktemp("sampled")
    return train_recorded(prepared, out, tiny_sd, SAMPLES)[0], out


def test_samples_are_saved_reproducible_and_leave_training_alone(
    sampled, plain_run, prepared, tmp_path, tiny_sd, caplog
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    written, out = sampled
    folder = out / "checkpoints" / "samples"
    names = [f"step-{s:06d}-{i:02d}.png" for s in (2, 4, 6) for i in (0, 1)]
    assert sorted(p.name for p in folder.iterdir()) == names
    with Image.open(folder / names[0]) as first, Image.open(folder / names[1]) as second:
        assert (first.size, second.size) == ((32, 48), (32, 32))  # --w/--h, else resolution
    for ours, theirs in zip(written, plain_run.written, strict=True):  # metadata names samples
        ours, theirs = read_checkpoint(ours).tensors, read_checkpoint(theirs).tensors
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    train_logged(prepared, tmp_path / "c", tiny_sd, caplog, config=SAMPLES)
    for name in names:
        assert digest(folder / name) == digest(tmp_path / "c/checkpoints/samples" / name)
    # the adapter changes between steps, and so do the samples of one prompt
    assert (folder / names[0]).read_bytes() != (folder / names[4]).read_bytes()
    events = EventAccumulator(str(next((out / "tb").rglob("events.out.*")).parent))
    events.Reload()
    assert sorted(events.Tags()["images"]) == ["samples/00", "samples/01"]
    assert [e.step for e in events.Images("samples/00")] == [2, 4, 6]


def test_a_resumed_run_keeps_the_samples_it_does_not_render_again(
    sampled, prepared, tmp_path, tiny_sd, caplog, monkeypatch
):
    # SAMPLES on TRAIN_CONFIG (6 steps, saved at 4): killed in step 5, resumed from step 4
    _, lines = crash_and_resume(prepared, tmp_path, tiny_sd, caplog, monkeypatch, SAMPLES)
    assert "resumed from step 4" in lines
    whole, resumed = (
        sampled[1] / "checkpoints" / "samples",
        tmp_path / "resumed/checkpoints/samples",
    )
    assert sorted(p.name for p in resumed.iterdir()) == sorted(p.name for p in whole.iterdir())
    assert all(digest(resumed / p.name) == digest(p) for p in whole.iterdir())
