"""Training on a Flux base (issue #30): the flow-matching objective on the transformer, T5 and
CLIP-L outputs cached, with the SD chain's guarantees (bit-identical CPU retrain from the
caches, exact resume). On the tiny FLUX.1 [dev]- and Chroma-architecture models."""

from __future__ import annotations

import json

import pytest
from conftest import crash_and_resume, digest, train, train_logged, train_recorded
from safetensors.torch import load_file

from loramill import LoramillError
from loramill.demo.tiny_flux import build_tiny_flux
from loramill.models.checkpoint import read_checkpoint

FLUX = {"t5xxl_max_token_length": 16, "timestep_sampling": "shift"}


@pytest.fixture(scope="module")
def tiny_flux_schnell(tmp_path_factory):
    return build_tiny_flux(tmp_path_factory.mktemp("schnell"), guidance=False)


@pytest.fixture(scope="module")
def flux_run(prepared, tiny_flux, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flux")
    written, lines = train_recorded(
        prepared, folder, str(tiny_flux), FLUX, cache_root=folder / "cache"
    )
    return written, lines, folder


def test_a_run_trains_kohyas_flux_targets_and_caches_t5_and_clip(flux_run):
    written, lines, folder = flux_run
    assert {"latents: 5 encoded, 0 reused", "text embeddings: 5 encoded, 0 reused"} <= set(lines)
    # one entry per caption: T5's states at t5xxl_max_token_length, CLIP-L's pooled output
    entry = load_file(next((folder / "cache" / "text_embeddings").rglob("*.safetensors")))
    assert entry["hidden"].shape == (16, 32) and entry["pooled"].shape == (32,)
    checkpoint = read_checkpoint(written[-1])
    assert checkpoint.components == ["transformer"]
    provenance = json.loads(checkpoint.metadata["loramill.provenance"])
    assert (provenance["family"], provenance["base_version"]) == ("flux", "flux1")
    modules = {k.rsplit(".lora_", 1)[0] for k in checkpoint.component("transformer")}
    # 2 double blocks × 14 diffusers modules (10 kohya modules) + 2 single blocks × 6 (3)
    assert len(modules) == 2 * 14 + 2 * 6
    assert any(t.abs().sum() > 0 for k, t in checkpoint.tensors.items() if "lora_B" in k)


def test_retraining_on_cpu_gives_identical_tensors_from_the_caches(
    flux_run, prepared, tiny_flux, tmp_path, caplog
):
    written, _, folder = flux_run
    again, lines = train_logged(
        prepared, tmp_path, str(tiny_flux), caplog, config=FLUX, cache_root=folder / "cache"
    )
    assert {"latents: 0 encoded, 5 reused", "text embeddings: 0 encoded, 5 reused"} <= set(lines)
    assert [digest(p) for p in again] == [digest(p) for p in written]


def test_apply_t5_attn_mask_reads_captions_with_their_mask_into_other_caches(
    flux_run, prepared, tiny_flux, tmp_path, caplog
):
    """kohya's apply_t5_attn_mask: the captions are encoded again (T5 with its mask; the
    latents are reused) and the mask is cached with them; the transformer then leaves the
    padding out, which trains another adapter from the same draws."""
    written, _, folder = flux_run
    config = {**FLUX, "apply_t5_attn_mask": True}
    masked, lines = train_logged(
        prepared, tmp_path, str(tiny_flux), caplog, config, cache_root=folder / "cache"
    )
    assert {"latents: 0 encoded, 5 reused", "text embeddings: 5 encoded, 0 reused"} <= set(lines)
    entries = [load_file(p) for p in (folder / "cache" / "text_embeddings").rglob("*.safetensors")]
    assert sum("mask" in entry for entry in entries) == 5
    assert digest(masked[-1]) != digest(written[-1])


def test_an_interrupted_run_with_clip_l_trained_resumes_bit_identical(
    prepared, tiny_flux, tmp_path, caplog, monkeypatch
):
    config = {**FLUX, "train_text_encoder": True, "timestep_sampling": "flux_shift"}
    resumed, lines = crash_and_resume(
        prepared, tmp_path, str(tiny_flux), caplog, monkeypatch, config
    )
    assert "resumed from step 4" in lines
    # T5 stays frozen (kohya's default): only CLIP-L's LoRA trains beside the transformer's
    assert read_checkpoint(resumed[-1]).components == ["transformer", "text_encoder"]
    uninterrupted, _ = train_logged(prepared, tmp_path / "whole", str(tiny_flux), caplog, config)
    assert [digest(p) for p in resumed] == [digest(p) for p in uninterrupted]


def test_chroma_trains_its_blocks_without_modulation_from_t5_alone(
    prepared, tiny_chroma, tmp_path, caplog
):
    config = {**FLUX, "timestep_sampling": "sigmoid", "model_prediction_type": "sigma_scaled"}
    written, lines = train_logged(
        prepared, tmp_path, str(tiny_chroma), caplog, config, cache_root=tmp_path / "cache"
    )
    assert "text embeddings: 5 encoded, 0 reused" in lines
    checkpoint = read_checkpoint(written[-1])
    provenance = json.loads(checkpoint.metadata["loramill.provenance"])
    assert (provenance["family"], provenance["base_version"]) == ("chroma", "chroma")
    modules = {k.rsplit(".lora_", 1)[0] for k in checkpoint.component("transformer")}
    assert len(modules) == 2 * 12 + 2 * 5 and not any("norm" in m for m in modules)


def test_fp8_and_quantized_bases_store_the_frozen_transformer_and_train(
    prepared, tiny_flux, tmp_path, caplog, bitsandbytes
):
    bf16 = {**FLUX, "mixed_precision": "bf16", "max_train_steps": 2, "save_steps": 2}
    plain, _ = train_logged(prepared, tmp_path / "bf16", str(tiny_flux), caplog, bf16)
    runs = {}
    for name, option in {"fp8": {"fp8_base": True}, "nf4": {"quantize_base": "nf4"}}.items():
        runs[name] = train_logged(
            prepared, tmp_path / name, str(tiny_flux), caplog, {**bf16, **option}
        )
    # every frozen Linear of the 4 blocks and the embedders: 14·2 + 6·2 in the blocks
    assert any(
        line.startswith("fp8_base: ") and int(line.split()[1]) > 40 for line in runs["fp8"][1]
    )
    assert any(
        line.startswith("quantize_base: ") and int(line.split()[1]) > 40 and line.endswith("nf4")
        for line in runs["nf4"][1]
    )
    # each a rounding of the base: another adapter, trained from the same draws
    adapters = {digest(plain[-1]), digest(runs["fp8"][0][-1]), digest(runs["nf4"][0][-1])}
    assert len(adapters) == 3
    again, _ = train_logged(
        prepared, tmp_path / "nf4-again", str(tiny_flux), caplog, {**bf16, "quantize_base": "nf4"}
    )
    assert digest(again[-1]) == digest(runs["nf4"][0][-1])  # quantizing draws nothing


@pytest.mark.parametrize(
    ("option", "message"),
    [
        ({"guidance_scale": 3.5}, "train.guidance_scale 3.5: this base model has no guidance"),
        ({"clip_skip": 2}, "train.clip_skip: an option of the Stable Diffusion families"),
    ],
)
def test_options_without_effect_on_the_base_are_refused_by_name(
    prepared, tiny_flux_schnell, tmp_path, option, message
):
    with pytest.raises(LoramillError, match=message):
        train(prepared, tmp_path, str(tiny_flux_schnell), **FLUX, **option)


def test_samples_render_with_the_flux_pipeline_during_training(prepared, tiny_flux, tmp_path):
    config = {**FLUX, "max_train_steps": 2, "save_steps": 2, "sample_every_n_steps": 2}
    # read with T5's mask, as training read the captions, at a size that is not square
    config |= {"sample_prompts": ["{trigger} --w 32 --h 48"], "sample_steps": 2}
    config |= {"apply_t5_attn_mask": True}
    train(prepared, tmp_path, str(tiny_flux), **config)
    (sample,) = (tmp_path / "checkpoints" / "samples").glob("*.png")
    from PIL import Image

    with Image.open(sample) as image:
        assert sample.name == "step-000002-00.png" and image.size == (32, 48)


def test_two_processes_of_batch_1_train_flux_as_one_process_of_batch_2(
    prepared, tiny_flux, tmp_path
):
    """DDP on the transformer and CLIP-L, as tests/test_distributed.py for SD: the noise and σ
    are drawn for the whole batch and each process takes its rows, the gradients averaged."""
    from safetensors.torch import load_file

    fast = {**FLUX, "max_train_steps": 4, "save_steps": 4, "threads": 1, "train_text_encoder": True}
    two = train(prepared, tmp_path / "two", str(tiny_flux), train_batch_size=1,
                num_processes=2, **fast)  # fmt: skip
    one = train(prepared, tmp_path / "one", str(tiny_flux), train_batch_size=2, **fast)
    a, b = load_file(str(one[-1])), load_file(str(two[-1]))
    assert a.keys() == b.keys() and any(k.startswith("text_encoder.") for k in a)
    off = {k: float((a[k] - b[k]).abs().max()) for k in a}  # gradients summed in another order
    assert max(off.values()) < 1e-4, max(off.items(), key=lambda item: item[1])
    assert max(float(a[k].abs().max()) for k in a if "lora_B" in k) > 1e-3
