"""Training: LoRA actually learns, checkpoints land where configured, and runs reproduce.

Each training costs seconds, so the tests share runs where they only read them: the session's
plain run (conftest.plain_run) is the baseline other settings are compared against, and one
text-encoder pair serves reproducibility and logging."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter

import pytest
import torch
from conftest import TRAIN_CONFIG as CONFIG
from conftest import crash_and_resume, digest, train, train_logged, train_recorded
from PIL import Image

from loramill import LoramillError
from loramill.models.checkpoint import (
    checkpoint_steps,
    list_checkpoints,
    read_checkpoint,
    step_name,
    step_of,
)
from loramill.train.config import TrainConfig
from loramill.train.state import state_key


def test_checkpoint_steps():
    assert checkpoint_steps(6, 4) == [4, 6]
    assert checkpoint_steps(40, 20) == [20, 40]
    assert checkpoint_steps(5, 10) == [5]


def test_checkpoint_names_spell_their_step():
    # the names users and other tools see; spelled out here, not taken from the module
    assert step_name(42) == "step-000042.safetensors"
    assert step_name(3, ".pt") == "step-000003.pt" and step_name(3, "") == "step-000003"
    assert step_of(step_name(1_234_567)) == 1_234_567
    assert step_of("step-000003-01.png") == step_of("step-000003") == 3
    with pytest.raises(LoramillError, match="not a checkpoint name"):
        step_of("last.safetensors")


def test_training_writes_checkpoints_that_moved_away_from_zero(plain_run):
    written = plain_run.written
    assert [p.name for p in written] == ["step-000004.safetensors", "step-000006.safetensors"]
    assert list_checkpoints(plain_run.folder / "checkpoints") == written
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
    assert record["base_version"] == "sd_v1"
    assert sum(record["buckets"].values()) == 5 and len(record["buckets"]) == 2
    events = list((plain_run.folder / "tb").rglob("events.out.tfevents.*"))
    assert events


@pytest.fixture(scope="module")
def text_encoder_pair(prepared, tiny_sd, tmp_path_factory):
    """Two runs of one config training the text encoder too, the first also plotting its
    loss: the reproducibility pair, and the first's log, TensorBoard and plot."""
    root = tmp_path_factory.mktemp("te-pair")
    config = {"train_text_encoder": True}
    first = train_recorded(prepared, root / "a", tiny_sd, config, loss_png=root / "loss.png")
    second, _ = train_recorded(prepared, root / "b", tiny_sd, config)
    return root, first, second


def test_same_inputs_and_config_give_bit_identical_adapters(
    text_encoder_pair, prepared, tmp_path, tiny_sd
):
    _, (first, _), second = text_encoder_pair
    # the second run drew no loss plot: the plot leaves the adapter alone too
    assert [digest(p) for p in first] == [digest(p) for p in second]
    assert any(k.startswith("text_encoder.") for k in read_checkpoint(first[-1]).tensors)
    other_seed = train(prepared, tmp_path / "c", tiny_sd, train_text_encoder=True, seed=4)
    assert other_seed[-1].read_bytes() != first[-1].read_bytes()


def test_learning_rate_changes_the_result(plain_run, prepared, tmp_path, tiny_sd):
    slow = read_checkpoint(plain_run.written[-1])
    fast = read_checkpoint(train(prepared, tmp_path / "b", tiny_sd, learning_rate=1e-2)[-1])
    assert any(not torch.equal(slow.tensors[k], fast.tensors[k]) for k in slow.tensors)


def test_unknown_option_is_named(prepared, tmp_path, tiny_sd):
    with pytest.raises(LoramillError, match=r"^train\.epochs: unknown option$"):
        train(prepared, tmp_path, tiny_sd, epochs=3)


# --- real size: caches, precision, resume (issue #6) ----------------------------------------


def test_vae_sees_at_most_vae_batch_size_images(prepared, tmp_path, tiny_sd, caplog, monkeypatch):
    from diffusers import AutoencoderKL

    seen = []
    encode = AutoencoderKL.encode

    def spy(self, pixels, *args, **kwargs):
        seen.append(pixels.shape[0])
        return encode(self, pixels, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", spy)
    config = {"vae_batch_size": 2, "max_train_steps": 1}
    _, lines = train_logged(
        prepared, tmp_path, tiny_sd, caplog, config=config, cache_root=tmp_path / "cache"
    )
    # 5 images in chunks of 2: the last chunk is padded, never the whole dataset at once.
    assert seen == [2, 2, 2]
    assert "latents: 5 encoded, 0 reused" in lines


def test_caches_are_reused_and_keyed_by_content(plain_run, prepared, tmp_path, tiny_sd, caplog):
    # The plain run filled a cache of its own; a copy, so that this test's runs leave it alone.
    first, lines = plain_run.written, plain_run.lines
    assert {"latents: 5 encoded, 0 reused", "text embeddings: 5 encoded, 0 reused"} <= set(lines)
    cache = shutil.copytree(plain_run.folder / "cache", tmp_path / "cache")
    # Another learning rate: nothing to encode. (One step: only the encoding is looked at.)
    _, lines = train_logged(
        prepared, tmp_path / "b", tiny_sd, caplog, cache_root=cache,
        config={"learning_rate": 5e-4, "max_train_steps": 1},
    )  # fmt: skip
    assert {"latents: 0 encoded, 5 reused", "text embeddings: 0 encoded, 5 reused"} <= set(lines)
    # A warm cache gives the very bytes a cold one gave.
    again, _ = train_logged(prepared, tmp_path / "c", tiny_sd, caplog, cache_root=cache)
    assert digest(first[-1]) == digest(again[-1])
    # One edited image: one latent.
    edited = tmp_path / "edited"
    shutil.copytree(prepared, edited)
    image = sorted((edited / "resized").glob("*.png"))[0]
    with Image.open(image) as original:
        original.transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(image)
    one_step = {"max_train_steps": 1}
    _, lines = train_logged(edited, tmp_path / "d", tiny_sd, caplog, one_step, cache_root=cache)
    assert "latents: 1 encoded, 4 reused" in lines
    # Another CPU thread count gives other bits: not reused.
    _, lines = train_logged(
        prepared, tmp_path / "e", tiny_sd, caplog, {**one_step, "threads": 2}, cache_root=cache
    )
    assert "latents: 5 encoded, 0 reused" in lines


def test_interrupted_run_resumes_bit_identical(
    plain_run, prepared, tmp_path, tiny_sd, caplog, monkeypatch
):
    # Killed in step 5 of TRAIN_CONFIG's 6, its state saved at step 4: the resumed steps need
    # the optimizer's moments and the RNGs of step 4 to end on the plain run's bytes.
    resumed, lines = crash_and_resume(prepared, tmp_path, tiny_sd, caplog, monkeypatch, {})
    assert "resumed from step 4" in lines
    assert [digest(p) for p in resumed] == [digest(p) for p in plain_run.written]
    # Finished with a constant schedule: the final state stays for a longer run, no other.
    assert sorted(p.name for p in (tmp_path / "state" / "state").iterdir()) == ["step-000006.pt"]


def test_longer_run_continues_and_matches_a_fresh_run(
    plain_run, prepared, tmp_path, tiny_sd, caplog
):
    def run(name, steps, **kwargs):
        config = {"max_train_steps": steps}
        return train_logged(prepared, tmp_path / name, tiny_sd, caplog, config=config, **kwargs)

    run("short", 4, state_dir=tmp_path / "state")
    longer, lines = run("long", 6, state_dir=tmp_path / "state")
    assert "resumed from step 4" in lines
    fresh = plain_run.written  # 6 steps from scratch
    assert [p.name for p in longer] == [p.name for p in fresh]
    assert [digest(p) for p in longer] == [digest(p) for p in fresh]


def test_state_key_ignores_stopping_options_only_for_total_free_schedules():
    fingerprint = {"params": {"train": {"max_train_steps": 4, "save_steps": 2, "seed": 1}}}

    def key(schedule, **train):
        changed = {"params": {"train": {**fingerprint["params"]["train"], **train}}}
        return state_key(changed, TrainConfig(lr_scheduler=schedule))

    assert key("constant") == key("constant", max_train_steps=8, save_steps=3)
    assert key("constant") != key("constant", seed=2)
    assert key("cosine") == key("cosine", save_steps=3)
    assert key("cosine") != key("cosine", max_train_steps=8)


def test_init_from_starts_from_the_given_weights(
    prepared, tmp_path, tiny_sd, caplog, monkeypatch, random_checkpoint
):
    from loramill.export.write import export_adapter
    from loramill.train.step import Training

    kohya, diffusers = tmp_path / "start.safetensors", tmp_path / "start.diffusers.safetensors"
    export_adapter(random_checkpoint, kohya, diffusers, "start")
    monkeypatch.setattr(Training, "step", lambda self: 1.0)  # a 0-step training
    start = read_checkpoint(random_checkpoint).tensors
    # the diffusers export holds the trained scale (alpha 2 / rank 4) in lora_B, alpha = rank
    for source, alpha, scale in ((kohya, 2, 1.0), (diffusers, 4, 0.5)):
        config = {"init_from": str(source), "train_text_encoder": True, "max_train_steps": 1}
        config["network_target"] = "attention"  # the network random_checkpoint holds
        config["alpha"] = alpha
        written, lines = train_logged(
            prepared, tmp_path / f"run-{source.stem}", tiny_sd, caplog, config=config
        )
        assert f"LoRA initialised from {source}" in lines
        loaded = read_checkpoint(written[-1]).tensors
        assert loaded.keys() == start.keys()
        for key, tensor in start.items():
            assert torch.equal(loaded[key], tensor * scale if "lora_B" in key else tensor), key
    with pytest.raises(
        LoramillError,
        match=r"^train\.init_from .*: the file has rank 4, alpha 2; "
        r"the config has rank 8, alpha 2 \(set train\.rank and train\.alpha\)$",
    ):
        train(prepared, tmp_path / "bad", tiny_sd, init_from=str(kohya), rank=8)
    with pytest.raises(
        LoramillError,
        match=r"^train\.init_from .*: the file has LoRA layers for 40 of the 60 modules "
        r"train\.network_target: kohya trains; set network_target to the file's",
    ):
        train(
            prepared, tmp_path / "partial", tiny_sd, init_from=str(kohya), train_text_encoder=True
        )


def test_bf16_mixed_precision_keeps_lora_weights_float32(plain_run, prepared, tmp_path, tiny_sd):
    bf16 = read_checkpoint(train(prepared, tmp_path / "bf16", tiny_sd, mixed_precision="bf16")[-1])
    fp32 = read_checkpoint(plain_run.written[-1])
    assert {t.dtype for t in bf16.tensors.values()} == {torch.float32}
    assert all(torch.isfinite(t).all() for t in bf16.tensors.values())
    # Autocast really ran: the result differs from float32 training.
    assert any(not torch.equal(bf16.tensors[k], fp32.tensors[k]) for k in fp32.tensors)


def test_bf16_lora_layers_take_their_input_uncast_with_the_same_bits(
    prepared, tmp_path, tiny_sd, monkeypatch
):
    """Under autocast the LoRA layers skip peft's cast of their input to the float32 LoRA
    weights (issue #28: it copied every activation and its gradient); autocast's matmuls see
    the same bf16 values either way, so the adapter is the same bits as with the cast."""
    options = {"mixed_precision": "bf16", "train_text_encoder": True}
    uncast = read_checkpoint(train(prepared, tmp_path / "uncast", tiny_sd, **options)[-1])
    monkeypatch.setattr("loramill.train.step.keep_input_dtype", lambda models: None)
    cast = read_checkpoint(train(prepared, tmp_path / "cast", tiny_sd, **options)[-1])
    assert uncast.tensors.keys() == cast.tensors.keys()
    assert any(k.startswith("text_encoder.") for k in cast.tensors)
    assert all(torch.equal(uncast.tensors[k], cast.tensors[k]) for k in cast.tensors)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"mixed_precision": "fp16"}, r"^train\.mixed_precision: fp16 needs a CUDA GPU"),
        ({"train_batch_size": 6}, r"^train\.train_batch_size: 6 is more than the dataset's 5"),
        ({"lr_warmup_steps": 10}, r"^train\.lr_warmup_steps: 10 has no effect with lr_sched"),
        ({"dtype": "float16"}, r"^train\.dtype: replaced by train\.mixed_precision"),
    ],
)
def test_refused_settings_say_what_to_change(prepared, tmp_path, tiny_sd, overrides, message):
    with pytest.raises(LoramillError, match=message):
        train(prepared, tmp_path, tiny_sd, call={"device": "cpu"}, **overrides)


def test_progress_tensorboard_and_loss_curve(text_encoder_pair):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    root, (_, lines), _ = text_encoder_pair
    # "train: 100%|██| 6/6 [00:01<00:00, 5.2step/s, loss=0.1234]" (or s/step when slow)
    progress = [line for line in lines if re.search(r"\| \d+/6 \[.*step", line)]
    assert progress and "6/6" in progress[-1] and "loss=" in progress[-1]
    events = EventAccumulator(str(next((root / "a" / "tb").rglob("events.out.*")).parent))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr/unet", "lr/text_encoder"} <= tags
    assert [e.step for e in events.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    with Image.open(root / "loss.png") as plot:
        assert plot.size[0] > 100


def test_captions_that_vary_per_step_and_flips_train_reproducibly_without_the_text_cache(
    prepared, tmp_path, tiny_sd, caplog
):
    # One pair for both kinds of per-step randomness, and a third run with the flips and
    # repeats only: what differs from it is the caption variation's doing.
    flips = {"flip_aug": True, "repeats": 3}
    config = {**flips, "shuffle_caption": True, "caption_dropout_rate": 0.3}
    first, lines = train_logged(prepared, tmp_path / "a", tiny_sd, caplog, config=config)
    again, _ = train_logged(prepared, tmp_path / "b", tiny_sd, caplog, config=config)
    fixed, _ = train_logged(prepared, tmp_path / "c", tiny_sd, caplog, config=flips)
    assert not any(line.startswith("text embeddings:") for line in lines)  # encoded per step
    assert [digest(p) for p in first] == [digest(p) for p in again]
    assert first[-1].read_bytes() != fixed[-1].read_bytes()
    # both orientations of the five images are cached: five more encodings than without
    encoded = [line for line in lines if line.startswith("latents:")]
    assert encoded and sum(int(n) for n in encoded[0].split()[1:4:2]) == 10


def test_other_optimizers_and_objectives_train_and_checkpointing_changes_nothing(
    plain_run, prepared, tmp_path, tiny_sd, caplog, monkeypatch
):
    """A reproducibility pair whose second run recomputes activations (gradient
    checkpointing): the same tensors prove both that these options train reproducibly and
    that checkpointing changes memory, not results."""
    from diffusers import UNet2DConditionModel

    enabled, enable = [], UNet2DConditionModel.enable_gradient_checkpointing
    monkeypatch.setattr(
        UNet2DConditionModel,
        "enable_gradient_checkpointing",
        lambda self: (enabled.append(True), enable(self))[1],
    )
    config = {
        "optimizer_type": "Lion",
        "optimizer_args": {"weight_decay": 0.01},
        "unet_lr": 1e-4,
        "min_snr_gamma": 5.0,
        "loss_type": "huber",
        "multires_noise_iterations": 2,
        "ip_noise_gamma": 0.05,
        "clip_skip": 2,
        "max_token_length": 150,
    }
    first, _ = train_logged(prepared, tmp_path / "a", tiny_sd, caplog, config=config)
    assert enabled == []
    config["gradient_checkpointing"] = True
    again, _ = train_logged(prepared, tmp_path / "b", tiny_sd, caplog, config=config)
    assert enabled == [True]
    for ours, theirs in zip(first, again, strict=True):
        # the provenance differs (it records gradient_checkpointing), the weights must not
        tensors = [read_checkpoint(p).tensors for p in (ours, theirs)]
        assert tensors[0].keys() == tensors[1].keys()
        assert all(torch.equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
    assert first[-1].read_bytes() != plain_run.written[-1].read_bytes()


def test_max_train_epochs_sets_the_steps(prepared, tmp_path, tiny_sd, caplog):
    manifest = json.loads((prepared / "resized" / "manifest.json").read_text())
    per_bucket = Counter(tuple(entry["bucket"]) for entry in manifest["images"])
    per_epoch = sum(-(-n // CONFIG["train_batch_size"]) for n in per_bucket.values())
    config = {"max_train_epochs": 2, "max_train_steps": 1000, "save_steps": 100}
    written, lines = train_logged(prepared, tmp_path / "e", tiny_sd, caplog, config=config)
    assert [p.name for p in written] == [f"step-{2 * per_epoch:06d}.safetensors"]
    assert f"2 epochs: {2 * per_epoch} steps" in lines
