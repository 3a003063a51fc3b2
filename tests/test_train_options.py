"""kohya's training options: each one's effect on state, not only that a run finishes."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loramill import LoramillError
from loramill.train.config import TrainConfig
from loramill.train.objective import input_noise, loss, sample_noise, weights
from loramill.train.optimizers import make_optimizer, make_scheduler


def groups():
    return [
        {"params": [torch.nn.Parameter(torch.zeros(3))], "lr": 1e-3},
        {"params": [torch.nn.Parameter(torch.zeros(2))], "lr": 5e-4},
    ]


@pytest.mark.parametrize(
    ("name", "cls", "args", "check"),
    [
        ("AdamW", "AdamW", {"betas": [0.8, 0.9], "eps": 1e-6}, {"betas": (0.8, 0.9), "eps": 1e-6}),
        ("Lion", "Lion", {"weight_decay": 0.1}, {"weight_decay": 0.1}),
        ("Prodigy", "Prodigy", {"d_coef": 2.0}, {"d_coef": 2.0}),
        ("Adafactor", "Adafactor", {}, {"relative_step": False, "scale_parameter": False}),
    ],
)  # fmt: skip
def test_optimizer_class_groups_and_args(name, cls, args, check):
    optimizer = make_optimizer(TrainConfig(optimizer_type=name, optimizer_args=args), groups())
    assert type(optimizer).__name__ == cls
    assert [g["lr"] for g in optimizer.param_groups] == [1e-3, 5e-4]
    assert all(optimizer.param_groups[0][k] == v for k, v in check.items())


def test_optimizer_errors_name_the_key():
    with pytest.raises(LoramillError, match=r"^train\.optimizer_args for AdamW: .*momentum"):
        make_optimizer(TrainConfig(optimizer_args={"momentum": 0.9}), groups())
    with pytest.raises(LoramillError, match=r"^train\.optimizer_type 'SGD': use AdamW"):
        TrainConfig(optimizer_type="SGD").check()
    with pytest.raises(LoramillError, match=r"^train\.optimizer_type: AdamW8bit .* CUDA"):
        TrainConfig(optimizer_type="AdamW8bit").check_device("cpu")
    with pytest.raises(LoramillError, match=r"^train\.loss_type 'l1': use l2 \| huber"):
        TrainConfig(loss_type="l1").check()


def lrs(cfg, steps):
    optimizer = make_optimizer(cfg, groups()[:1])
    scheduler = make_scheduler(cfg, optimizer, processes=1)
    seen = []
    for _ in range(steps):
        seen.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return seen


def test_cosine_with_restarts_and_polynomial_schedules():
    cfg = TrainConfig(
        learning_rate=1e-3,
        lr_scheduler="cosine_with_restarts",
        max_train_steps=10,
        lr_scheduler_num_cycles=2,
    )
    seen = lrs(cfg, 10)
    assert seen[0] == pytest.approx(1e-3) and seen[5] == pytest.approx(1e-3)  # restarted
    assert seen[2] == pytest.approx(
        1e-3 * 0.5 * (1 + torch.cos(torch.tensor(0.4 * torch.pi)).item())
    )
    cfg = TrainConfig(
        learning_rate=1e-3, lr_scheduler="polynomial", max_train_steps=10, lr_scheduler_power=2.0
    )
    seen = lrs(cfg, 10)
    # (lr − lr_end) · (1 − t/N)² + lr_end, diffusers' lr_end being 1e-7
    assert seen[5] == pytest.approx((1e-3 - 1e-7) * 0.25 + 1e-7)
    assert seen[0] == pytest.approx(1e-3)


SCHEDULER = SimpleNamespace(
    alphas_cumprod=torch.tensor([0.8, 0.5, 0.1]),  # SNR 4, 1, 1/9
    config=SimpleNamespace(prediction_type="epsilon"),
)


def test_min_snr_weights_a_hand_computed_batch():
    timesteps = torch.tensor([0, 1, 2])
    cfg = TrainConfig(min_snr_gamma=2.0)
    assert weights(SCHEDULER, timesteps, cfg).tolist() == pytest.approx([0.5, 1.0, 1.0])
    v = SimpleNamespace(
        alphas_cumprod=SCHEDULER.alphas_cumprod,
        config=SimpleNamespace(prediction_type="v_prediction"),
    )
    assert weights(v, timesteps, cfg).tolist() == pytest.approx([2 / 5, 1 / 2, (1 / 9) / (10 / 9)])
    scaled = TrainConfig(scale_v_pred_loss_like_noise_pred=True)
    assert weights(v, timesteps, scaled).tolist() == pytest.approx([4 / 5, 1 / 2, 1 / 10])
    assert weights(SCHEDULER, timesteps, TrainConfig()) is None
    # per-image squared errors 1, 2, 3 → (0.5·1 + 1·2 + 1·3) / 3
    target = torch.zeros(3, 1, 2, 2)
    pred = torch.stack([torch.full((1, 2, 2), e**0.5) for e in (1.0, 2.0, 3.0)])
    value = loss(pred, target, weights(SCHEDULER, timesteps, cfg), cfg)
    assert value.item() == pytest.approx(5.5 / 3)


def test_robust_losses():
    pred, target = torch.full((1, 1, 2, 2), 2.0), torch.zeros(1, 1, 2, 2)
    huber = loss(pred, target, None, TrainConfig(loss_type="huber", huber_c=0.1))
    smooth = loss(pred, target, None, TrainConfig(loss_type="smooth_l1", huber_c=0.1))
    assert huber.item() == pytest.approx(0.1 * (2 - 0.05))
    assert smooth.item() == pytest.approx(2 - 0.05)
    assert loss(pred, target, None, TrainConfig()).item() == pytest.approx(4.0)


def test_noise_options():
    latents = torch.zeros(2, 4, 16, 16)

    def draw(**options):
        return sample_noise(latents, TrainConfig(**options), torch.Generator().manual_seed(0))

    plain = draw()
    assert torch.equal(
        plain, torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    )
    pyramid = draw(multires_noise_iterations=3)
    assert not torch.equal(pyramid, plain) and pyramid.std().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.equal(pyramid, draw(multires_noise_iterations=3))
    offset = draw(noise_offset=0.5) - plain  # constant per image and channel
    assert torch.allclose(offset, offset[:, :, :1, :1].expand_as(offset))
    rng = torch.Generator().manual_seed(1)
    perturbed = input_noise(plain, TrainConfig(ip_noise_gamma=0.1), rng)
    assert 0 < (perturbed - plain).std().item() < 0.2
    assert input_noise(plain, TrainConfig(), rng) is plain


def test_clip_skip_takes_the_earlier_layer_through_the_final_norm(tiny_sd):
    from loramill.models.base_model import load_pipeline
    from loramill.models.clip_text import Conditioning
    from loramill.models.sd import encode_prompts

    pipe = load_pipeline(tiny_sd)
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    with torch.no_grad():
        last = encode_prompts(tokenizer, encoder, ["a red circle"])
        skipped = encode_prompts(tokenizer, encoder, ["a red circle"], Conditioning(clip_skip=2))
        tokens = tokenizer(["a red circle"], padding="max_length", return_tensors="pt").input_ids
        states = encoder(tokens, output_hidden_states=True).hidden_states
    assert torch.equal(last, encoder(tokens)[0])
    assert torch.allclose(skipped, encoder.final_layer_norm(states[-2]))
    assert not torch.allclose(skipped, last)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lr_scheduler_num_cycles": 3}, r"^train\.lr_scheduler_num_cycles: 3 has no effect with "
         r"train\.lr_scheduler: constant; use lr_scheduler: cosine_with_restarts"),
        ({"lr_scheduler": "cosine", "lr_scheduler_power": 2.0},
         r"^train\.lr_scheduler_power: 2\.0 has no effect with train\.lr_scheduler: cosine"),
        ({"huber_c": 0.5}, r"^train\.huber_c: 0\.5 has no effect with train\.loss_type: l2; "
         r"use loss_type: huber or smooth_l1"),
        ({"multires_noise_discount": 0.5}, r"^train\.multires_noise_discount has no effect "
         r"with train\.multires_noise_iterations: 0"),
        ({"cache_latents": False, "vae_batch_size": 4}, r"^train\.vae_batch_size: 4 has no "
         r"effect with train\.cache_latents: false; use cache_latents: true"),
    ],
)  # fmt: skip
def test_options_without_effect_are_refused_naming_both_keys(options, message):
    with pytest.raises(LoramillError, match=message):
        TrainConfig(**options).check()
    TrainConfig(lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=3).check()
    TrainConfig(loss_type="huber", huber_c=0.5).check()


def test_max_token_length_reads_long_captions_in_chunks(tiny_sd):
    from loramill.models.base_model import load_pipeline
    from loramill.models.clip_text import Conditioning
    from loramill.models.sd import encode_prompts

    pipe = load_pipeline(tiny_sd)
    short = "a red circle"
    words = []
    while len(pipe.tokenizer(", ".join(words)).input_ids) < 100:  # past 75, within 150
        words.append(f"word{len(words)}")
    long = ", ".join(words)
    with torch.no_grad():
        standard = encode_prompts(pipe.tokenizer, pipe.text_encoder, [short, long])
        chunked = encode_prompts(
            pipe.tokenizer, pipe.text_encoder, [short, long], Conditioning(max_token_length=150)
        )
        other_tail = encode_prompts(
            pipe.tokenizer,
            pipe.text_encoder,
            [long + ", zebra"],
            Conditioning(max_token_length=150),
        )
        cut_tail = encode_prompts(pipe.tokenizer, pipe.text_encoder, [long + ", zebra"])
    assert standard.shape[1] == 77 and chunked.shape[1] == 152
    # a short caption: the first chunk is what 75 tokens give (start token and 75)
    assert torch.allclose(chunked[0, :76], standard[0, :76])
    # words past 75 tokens reach the conditioning only with the longer length
    assert torch.equal(cut_tail[0], standard[1])
    assert not torch.allclose(other_tail[0], chunked[1])


def test_latents_encoded_per_step_train_the_cached_runs_adapter(
    prepared, tmp_path, tiny_sd, caplog
):
    """cache_latents: false encodes each batch every step and caches nothing; with batches
    of one the encoder sees the same shapes as when caching, so the adapter is the same."""
    from conftest import train_logged

    from loramill.models.checkpoint import read_checkpoint

    config = {"train_batch_size": 1, "vae_batch_size": 1, "flip_aug": True}
    cached, lines = train_logged(
        prepared, tmp_path / "a", tiny_sd, caplog, config=config, cache_root=tmp_path / "c1"
    )
    assert any(line.startswith("latents: 10 encoded") for line in lines)
    config["cache_latents"] = False
    direct, lines = train_logged(
        prepared, tmp_path / "b", tiny_sd, caplog, config=config, cache_root=tmp_path / "c2"
    )
    assert not any(line.startswith("latents:") for line in lines)
    assert not (tmp_path / "c2" / "latents").exists() or not any(
        (tmp_path / "c2" / "latents").rglob("*.safetensors")
    )
    ours, theirs = read_checkpoint(cached[-1]).tensors, read_checkpoint(direct[-1]).tensors
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_sdpa_off_uses_the_math_attention_with_the_same_result(tiny_sd):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from loramill.models.base_model import load_pipeline, use_sdpa

    pipes = [load_pipeline(tiny_sd), load_pipeline(tiny_sd)]
    use_sdpa(pipes[1], False)
    kinds = [{type(p) for p in pipe.unet.attn_processors.values()} for pipe in pipes]
    assert kinds == [{AttnProcessor2_0}, {AttnProcessor}]
    assert pipes[1].text_encoder.config._attn_implementation == "eager"
    torch.manual_seed(0)
    sample, hidden = (
        torch.randn(1, 4, 8, 8),
        torch.randn(1, 77, pipes[0].unet.config.cross_attention_dim),
    )
    tokens = torch.randint(0, 1000, (1, 77))
    with torch.no_grad():
        outs = [pipe.unet(sample, 10, hidden).sample for pipe in pipes]
        texts = [pipe.text_encoder(tokens)[0] for pipe in pipes]
    assert torch.allclose(*outs, atol=1e-5) and torch.allclose(*texts, atol=1e-5)


def test_timesteps_are_drawn_from_min_timestep_to_max_timestep(
    prepared, tmp_path, tiny_sd, caplog, monkeypatch
):
    from conftest import train_logged
    from diffusers import DDPMScheduler

    drawn, add_noise = [], DDPMScheduler.add_noise

    def recorded(self, latents, noise, timesteps):
        drawn.extend(timesteps.tolist())
        return add_noise(self, latents, noise, timesteps)

    monkeypatch.setattr(DDPMScheduler, "add_noise", recorded)
    config = {"min_timestep": 900, "max_timestep": 903}
    train_logged(prepared, tmp_path / "late", tiny_sd, caplog, config=config)
    assert set(drawn) <= {900, 901, 902} and len(drawn) >= 6  # a batch of 1 or 2 per step
    with pytest.raises(LoramillError, match=r"^train.max_timestep 1001: the base model's sched"):
        train_logged(prepared, tmp_path / "x", tiny_sd, caplog, config={"max_timestep": 1001})
    with pytest.raises(LoramillError, match=r"^train.max_timestep 5: must be above train.min_"):
        TrainConfig.from_dict({"min_timestep": 5, "max_timestep": 5})
