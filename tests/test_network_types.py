"""Network types users share (issue #31): LyCORIS's LoHa and LoKr through peft's layers, DoRA
as peft's LoRA with a magnitude per input column (loramill.models.dora), exported with
LyCORIS's keys and checked against the rules by which AUTOMATIC1111 and ComfyUI apply them
(their formulas for each type, loramill.export.client_rules)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from conftest import SAMPLE_PROVENANCE, TINY_SD
from safetensors.torch import load_file, save_file

from loramill import LoramillError
from loramill.export.client_rules import DORA
from loramill.export.verify import Clients, verify_exports
from loramill.export.write import export_adapter
from loramill.models.checkpoint import read_checkpoint, save_checkpoint
from loramill.models.network import NetworkSpec, add_lora

TYPES = {  # a tested network → its type and options
    "loha": {"network_type": "loha"},
    "lokr": {"network_type": "lokr"},  # on the tiny model: w1 whole, w2 of 8 decomposed
    "lokr_full": {"network_type": "lokr", "full_matrix": True},  # every factor whole: scale 1
    "lokr_decomposed": {"network_type": "lokr", "decompose_both": True, "factor": 4},
}


def spec_of(name: str) -> NetworkSpec:
    return NetworkSpec("kohya_conv", 4, 2.0, conv_rank=2, conv_alpha=4.0, **TYPES[name])


def base_models(path=TINY_SD) -> dict:
    from loramill.models.base_model import load_pipeline

    pipe = load_pipeline(str(path))
    encoders = [c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None)]
    return {c: getattr(pipe, c) for c in ("unet", *encoders)}


def random_checkpoint(folder, spec, base=TINY_SD):
    """A checkpoint of the network with random values in every factor (the zero-initialised
    ones too), and the models that hold it."""
    models = base_models(base)
    torch.manual_seed(1)
    add_lora(models, spec, init=False)
    path = folder / "step-000001.safetensors"
    save_checkpoint(path, models, {"loramill.provenance": json.dumps(SAMPLE_PROVENANCE)})
    return path, models


def peft_deltas(models: dict, strength: float) -> dict:
    """(component, module) → the weight change peft's layers make at ``strength``, flattened:
    the trained network's delta, from peft's own code."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    deltas = {}
    for component, model in models.items():
        for name, layer in model.named_modules():
            if isinstance(layer, BaseTunerLayer):
                layer.set_scale("default", strength)
                deltas[(component, name)] = layer.get_delta_weight("default").flatten(1).float()
                layer.set_scale("default", 1.0)
    return deltas


@pytest.mark.parametrize("name", sorted(TYPES))
def test_each_type_lands_in_a1111_and_comfyui_at_the_trained_delta(tmp_path, name):
    """The weight change each client's rule applies, at strength 1 and 0.5, is the change
    peft's layers make at that strength, module by module; the export job's check agrees."""
    spec = spec_of(name)
    checkpoint, trained = random_checkpoint(tmp_path, spec)
    kohya = tmp_path / "x.safetensors"
    export_adapter(checkpoint, kohya, None, "x")
    models = base_models()
    verify_exports({kohya: checkpoint}, models, spec, set(models))

    tensors = load_file(str(kohya))
    assert clients_of(models) == ["ComfyUI"]
    assert any(".hada_w1_a" in k or ".lokr_w1" in k for k in tensors)
    clients = Clients(models)
    for strength in (1.0, 0.5):
        want = peft_deltas(trained, strength)
        for client in clients.of("lycoris"):  # the tiny UNet's layout is ComfyUI's only
            applied, unread = clients.load(client, kohya, tensors)
            assert not unread
            expected = clients.expected(client, want)
            assert applied.keys() == expected.keys()
            for target, (delta, down, scale) in applied.items():
                assert down is None
                torch.testing.assert_close(strength * scale * delta, expected[target],
                                           rtol=1e-5, atol=1e-6)  # fmt: skip


def clients_of(models):
    return Clients(models).of("lycoris")


def test_a_wrong_scale_in_the_file_is_refused(tmp_path, monkeypatch):
    """Mutations of the export: a LoHa module's alpha doubled, and a LoKr of whole factors
    written without its trained scale folded in (the clients apply those at 1, peft trained
    them at alpha / rank = 0.5) are each refused by the export's check."""
    import loramill.export.write as write

    spec = spec_of("loha")
    checkpoint, _ = random_checkpoint(tmp_path, spec)
    kohya = tmp_path / "loha.safetensors"
    export_adapter(checkpoint, kohya, None, "x")
    tensors = load_file(str(kohya))
    module = "lora_unet_up_blocks_1_attentions_0_proj_in"
    tensors[f"{module}.alpha"] = tensors[f"{module}.alpha"] * 2
    save_file(tensors, str(tmp_path / "wrong.safetensors"), read_checkpoint(kohya).metadata)
    models = base_models()
    with pytest.raises(LoramillError, match=r"ComfyUI applies .*proj_in at 2× the trained"):
        verify_exports({tmp_path / "wrong.safetensors": checkpoint}, models, spec, set(models))

    lokr = spec_of("lokr")
    folder = tmp_path / "lokr"
    folder.mkdir()
    checkpoint, _ = random_checkpoint(folder, lokr)
    monkeypatch.setattr(write, "fold", lambda parts, scale, alpha: 1.0)
    export_adapter(checkpoint, folder / "unfolded.safetensors", None, "x")
    with pytest.raises(LoramillError, match=r"ComfyUI applies .* at 2× the trained delta"):
        verify_exports({folder / "unfolded.safetensors": checkpoint}, models, lokr, set(models))


LOKR_CONV = {  # a 3×3 conv of 320 → 320 (16 · 20 each way): w2 decomposed at rank 2
    "lokr_w1": torch.randn(16, 16),
    "lokr_w2_a": torch.randn(20, 2),
    "lokr_w2_b": torch.randn(2, 20 * 9),
    "alpha": torch.tensor(1.0),
}
LOHA_LINEAR = {f"hada_w{i}_{p}": torch.randn(*((320, 4) if p == "a" else (4, 768)))
               for i in (1, 2) for p in "ab"} | {"alpha": torch.tensor(2.0)}  # fmt: skip


@pytest.mark.parametrize("client", ["AUTOMATIC1111", "ComfyUI"])
def test_a1111_and_comfyui_rules_on_sd15_put_each_type_on_its_ldm_module(sd15_clients, client):
    """LyCORIS modules on SD1.5's layout: a LoHa cross-attention key projection (dim 4,
    alpha 2) and a LoKr ResNet 3×3 conv (w2's rank 2, alpha 1) land on their LDM modules with
    (w1_a w1_b) ⊙ (w2_a w2_b) · 2/4 and kron(w1, w2_a w2_b) · 1/2; a DoRA feed-forward layer
    lands its pair and its magnitude per input column."""
    attn = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    conv = "lora_unet_up_blocks_1_resnets_2_conv1"
    ff = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"
    tensors = {f"{attn}.{k}": t for k, t in LOHA_LINEAR.items()}
    tensors |= {f"{conv}.{k}": t for k, t in LOKR_CONV.items()}
    dora = {"lora_down.weight": torch.randn(4, 5120), "lora_up.weight": torch.randn(1280, 4)}
    dora |= {"alpha": torch.tensor(4.0), "dora_scale": torch.rand(1, 5120)}
    tensors |= {f"{ff}.{k}": t for k, t in dora.items()}
    applied, unread = sd15_clients.load(client, "x", tensors)
    assert not unread
    layout = sd15_clients.layout
    loha_target = layout.ldm_module(
        "unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    )
    lokr_target = layout.ldm_module("unet", "up_blocks.1.resnets.2.conv1")
    dora_target = layout.ldm_module("unet", "mid_block.attentions.0.transformer_blocks.0.ff.net.2")
    assert applied.keys() == {loha_target, lokr_target, dora_target, dora_target + DORA}
    assert torch.equal(applied[dora_target + DORA][0].flatten(), dora["dora_scale"].flatten())
    assert applied[dora_target][2] == 1.0
    h = LOHA_LINEAR
    loha = (h["hada_w1_a"] @ h["hada_w1_b"]) * (h["hada_w2_a"] @ h["hada_w2_b"])
    delta, down, scale = applied[loha_target]
    assert down is None and scale == 0.5
    torch.testing.assert_close(delta, loha)
    w2 = (LOKR_CONV["lokr_w2_a"] @ LOKR_CONV["lokr_w2_b"]).reshape(20, 20, 3, 3)
    lokr = torch.kron(LOKR_CONV["lokr_w1"][:, :, None, None], w2)
    delta, down, scale = applied[lokr_target]
    assert scale == 0.5 and delta.shape == (320, 320 * 9)
    torch.testing.assert_close(delta, lokr.flatten(1))


@pytest.mark.parametrize("kind", ["loha", "dora"])
def test_the_grid_draws_a_lycoris_file_as_the_trained_network(tmp_path, kind):
    """diffusers refuses LoHa keys and drops DoRA's magnitudes; the grid applies the file to
    the weights as A1111 and ComfyUI do: at strength 1 the picture is the trained network's
    (its layers on the base model, within rounding), at 0 the base model's bit for bit, at 0.5
    neither."""
    import numpy as np
    from PIL import Image
    from test_grid import SETTINGS, _exported, _with_step, draw

    from loramill.models.base_model import load_pipeline
    from loramill.models.checkpoint import load_network_state

    spec = replace(spec_of("loha"), network_type=kind, alpha=64.0)  # a change plain to see
    raw, _ = random_checkpoint(tmp_path, spec)
    checkpoint = _with_step(raw, tmp_path / "step-000010.safetensors", 10)
    for tensor in (t for k, t in read_checkpoint(checkpoint).tensors.items() if "_b" in k):
        assert tensor.abs().max() > 0  # random, not peft's zero init
    small = {**SETTINGS, "prompts": ["a red circle"], "strengths": [0.0, 0.5, 1.0]}
    small |= {"x": "strength", "y": "checkpoint"}
    if kind == "loha":
        with pytest.raises(ValueError, match="have not been correctly renamed"):  # diffusers'
            load_pipeline(str(TINY_SD)).load_lora_weights(str(_exported(checkpoint)))
    draw(str(TINY_SD), [_exported(checkpoint)], tmp_path, tmp_path / "cache", **small)
    cells = json.loads((tmp_path / "g.json").read_text())["cells"]
    image = np.asarray(Image.open(tmp_path / "g.png").convert("RGB"))

    def cell(strength):
        (box,) = [c["box"] for c in cells if c["unet_strength"] == strength]
        return image[box[1] : box[3], box[0] : box[2]].astype(int)

    def render(pipe):
        generator = torch.Generator().manual_seed(small["seed"])
        picture = pipe("a red circle", num_inference_steps=small["num_inference_steps"],
                       guidance_scale=small["guidance_scale"], height=64, width=64,
                       generator=generator).images[0]  # fmt: skip
        return np.asarray(picture.convert("RGB").resize((256, 256), 0)).astype(int)

    pipe = load_pipeline(str(TINY_SD))
    assert np.array_equal(cell(0.0), render(pipe))
    trained = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    add_lora(trained, spec)
    load_network_state(trained, read_checkpoint(checkpoint).tensors)
    expected = render(pipe)
    assert np.abs(cell(1.0) - expected).max() <= 2
    assert np.abs(cell(1.0) - cell(0.0)).max() > 40  # the adapter shows, far past rounding
    assert not np.array_equal(cell(0.5), cell(1.0)) and not np.array_equal(cell(0.5), cell(0.0))


RUNS = {  # (type, family) → its options: every type on SD1 and SDXL, text encoders trained
    ("loha", "sd"): {"rank_dropout": 0.25, "module_dropout": 0.1},  # peft's, drawn per step
    ("dora", "sd"): {"network_dropout": 0.1, "loraplus_lr_ratio": 4},
    ("dora", "sdxl"): {"gradient_checkpointing": True},
    ("lokr", "sd"): {"gradient_checkpointing": True, "factor": 4, "decompose_both": True},
    ("loha", "sdxl"): {"gradient_checkpointing": True, "mid_lr_weight": [1.0, 0.5, 1.0]},
    ("lokr", "sdxl"): {},
}


@pytest.mark.parametrize(("kind", "family"), sorted(RUNS))
def test_each_type_trains_resumes_bit_identical_and_exports_verified(
    kind, family, prepared, tiny_sd, tiny_sdxl, tmp_path, caplog, monkeypatch
):
    """A run killed in step 5 and resumed writes the checkpoints an uninterrupted run does,
    byte for byte (which retrains the first steps identically too); its last checkpoint
    exports to a kohya file of the type's keys that the export's check passes."""
    from conftest import crash_and_resume, digest, train_logged

    from loramill.export.job import unet_verifier
    from loramill.train.config import TrainConfig

    base = str(tiny_sdxl if family == "sdxl" else tiny_sd)
    config = {"network_type": kind, "train_text_encoder": True, **RUNS[(kind, family)]}
    resumed, lines = crash_and_resume(prepared, tmp_path, base, caplog, monkeypatch, config)
    assert "resumed from step 4" in lines
    whole, _ = train_logged(prepared, tmp_path / "whole", base, caplog, config)
    assert [digest(p) for p in resumed] == [digest(p) for p in whole]

    checkpoint = read_checkpoint(whole[-1])
    assert checkpoint.network_type == kind
    marker = {"loha": ".hada_w1_a", "lokr": ".lokr_w1", "dora": ".lora_dora_scale"}[kind]
    assert any(marker in key for key in checkpoint.tensors)
    cfg = TrainConfig.from_dict({**conftest_train_config(), **config})
    options, verify = unet_verifier(base, False, cfg)
    kohya = tmp_path / "x.safetensors"
    export_adapter(whole[-1], kohya, None, "x", **options)
    verify({kohya: whole[-1]})
    with pytest.raises(LoramillError, match=f"diffusers loads no {kind} adapter"):
        export_adapter(whole[-1], kohya, tmp_path / "x.diffusers.safetensors", "x", **options)


def conftest_train_config() -> dict:
    from conftest import TRAIN_CONFIG

    return TRAIN_CONFIG


@pytest.mark.parametrize("name", sorted(TYPES))
def test_init_from_reads_each_types_kohya_file_back(tmp_path, name):
    """A kohya file of each type reads back into the trained tensors exactly (LoKr's folded
    scale divided out); a file of another type, or of another LoKr factor, is refused."""
    from loramill.train.init_from import read_init_weights

    spec = spec_of(name)
    checkpoint, _ = random_checkpoint(tmp_path, spec)
    kohya = read_back_exactly(checkpoint, spec)

    other = replace(spec, network_type="lora")
    plain = base_models()
    add_lora(plain, other)
    kind = spec.network_type
    with pytest.raises(LoramillError, match=f"holds a {kind} network; set train.network_type"):
        read_init_weights(kohya, plain, other)
    if name == "lokr":  # another factor splits w2 into a rank-4 product
        refactored = replace(spec, factor=2)
        layers = base_models()
        add_lora(layers, refactored)
        parts = r"has lokr_w1\+lokr_w2 in the file, lokr_w1\+lokr_w2_a\+lokr_w2_b in the config"
        with pytest.raises(LoramillError, match=parts):
            read_init_weights(kohya, layers, refactored)


def test_init_from_reads_a_dora_file_back(tmp_path):
    """DoRA's dora_scale (1, in) reads back into the layers' magnitudes (in,) exactly."""
    checkpoint, _, spec = dora_checkpoint(tmp_path)
    read_back_exactly(checkpoint, spec)
    assert any(k.endswith(".lora_dora_scale") for k in read_checkpoint(checkpoint).tensors)


def read_back_exactly(checkpoint, spec):
    """Export ``checkpoint``'s kohya file; init_from must read it into the same tensors."""
    from loramill.train.init_from import read_init_weights

    kohya = checkpoint.parent / "x.safetensors"
    export_adapter(checkpoint, kohya, None, "x")
    models = base_models()
    add_lora(models, spec)
    read = read_init_weights(kohya, models, spec)
    source = read_checkpoint(checkpoint).tensors
    assert read.keys() == source.keys()
    assert all(torch.equal(read[key], tensor) for key, tensor in source.items())
    return kohya


def test_a_lokr_run_continues_from_its_kohya_export(prepared, tiny_sd, tmp_path):
    """A run from a LoKr export starts at its weights: at a vanishing learning rate it ends
    where the exported run did, a fresh run at its own start. The export job of a dataset
    that trained LoRA before removes its diffusers-format file."""
    from conftest import TRAIN_CONFIG, train

    from loramill.export.job import export_and_verify

    config = {"network_type": "lokr", "max_train_steps": 2, "save_steps": 2}
    written = train(prepared, tmp_path, tiny_sd, **config)
    out = tmp_path / "exports"
    out.mkdir()
    (out / "lokr.diffusers.safetensors").write_bytes(b"an earlier LoRA's")
    paths = [out / "lokr.safetensors", None, out / "lokr.md", out / "steps"]
    export_and_verify(tmp_path / "checkpoints", *paths, "lokr", {"save_precision": "fp32"},
                      tiny_sd, False, {**TRAIN_CONFIG, **config})  # fmt: skip
    assert sorted(p.name for p in out.iterdir()) == ["lokr.html", "lokr.md", "lokr.safetensors",
                                                     "steps"]  # fmt: skip
    still = {**config, "learning_rate": 1e-12}
    again = train(prepared, tmp_path / "again", tiny_sd, init_from=str(paths[0]), **still)
    fresh = train(prepared, tmp_path / "fresh", tiny_sd, **still)
    trained, ends = read_checkpoint(written[-1]).tensors, read_checkpoint(again[-1]).tensors
    assert ends.keys() == trained.keys()
    assert all(torch.allclose(ends[k], trained[k], atol=1e-7) for k in trained)
    start = read_checkpoint(fresh[-1]).tensors
    assert not all(torch.allclose(start[k], trained[k], atol=1e-4) for k in trained)


def dora_checkpoint(folder):
    """A DoRA checkpoint with random pairs and magnitudes off the base's column norms (a
    fresh DoRA starts at them, where any axis would look right)."""
    spec = NetworkSpec("kohya_conv", 4, 2.0, conv_rank=2, conv_alpha=4.0, network_type="dora")
    models = base_models()
    torch.manual_seed(1)
    add_lora(models, spec, init=False)
    with torch.no_grad():
        for name, param in models["unet"].named_parameters():
            if "lora_dora_scale" in name:
                param.mul_(torch.rand(param.shape) + 0.5)
    path = folder / "step-000001.safetensors"
    save_checkpoint(path, models, {"loramill.provenance": json.dumps(SAMPLE_PROVENANCE)})
    return path, models, spec


def test_dora_lands_per_input_column_and_patches_the_trained_weights(tmp_path, monkeypatch):
    """Each DoRA module of the file, patched in by the clients' formula (W + s·((W + ΔW) ·
    m / ‖W + ΔW‖ − W), per input column), computes what the trained layer computes at
    strength 1, and half of its change at 0.5; the export's check passes, and fails for a
    magnitude written per output row (ComfyUI would read it so, and A1111 broadcast it)."""
    import loramill.export.write as write
    from loramill.export.client_rules import patched_weight

    checkpoint, trained, spec = dora_checkpoint(tmp_path)
    kohya = tmp_path / "dora.safetensors"
    export_adapter(checkpoint, kohya, None, "x")
    models = base_models()
    verify_exports({kohya: checkpoint}, models, spec, set(models))

    tensors = load_file(str(kohya))
    names = Clients(models).names
    checked = 0
    for component, model in trained.items():
        for path, layer in model.named_modules():
            if not hasattr(layer, "lora_dora_scale"):
                continue
            name = names.module(component, path)
            parts = {k.split(".", 1)[1]: t for k, t in tensors.items() if k.split(".")[0] == name}
            assert parts["dora_scale"].shape[:2] == (1, layer.get_base_layer().weight.shape[1])
            base = layer.get_base_layer()
            x = torch.randn(2, base.weight.shape[1], *([5, 5] if base.weight.ndim == 4 else []))
            run = (
                torch.nn.functional.conv2d if base.weight.ndim == 4 else torch.nn.functional.linear
            )
            options = (
                {"padding": base.padding, "stride": base.stride} if base.weight.ndim == 4 else {}
            )
            with torch.no_grad():
                want, plain = layer(x), base(x)
                for strength, expected in ((1.0, want), (0.5, (want + plain) / 2)):
                    got = run(x, patched_weight(parts, base.weight, strength), base.bias, **options)
                    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
            checked += 1
    assert checked > 20

    monkeypatch.setattr(
        write,
        "dora_scale",
        lambda magnitude, down: magnitude.reshape(-1, 1, *[1] * (down.ndim - 2)),
    )
    export_adapter(checkpoint, tmp_path / "rows.safetensors", None, "x")
    with pytest.raises(LoramillError, match=r"ComfyUI lands \d+ of the \d+ trained modules"):
        verify_exports({tmp_path / "rows.safetensors": checkpoint}, models, spec, set(models))


def test_a_train_jobs_memory_request_counts_its_network_type(tiny_sd):
    """Snakemake's mem_mb for a train job asks more for LoHa, LoKr and DoRA (measured on SD1.5:
    bench/README.md), by a share of the weights; an export or grid job asks the same."""
    from loramill.models.base_model import NETWORK_TYPE_MEMORY, float32_bytes, job_mem_mb

    weights_mb = sum(float32_bytes(tiny_sd).values()) / 2**20
    lora = job_mem_mb(tiny_sd, 512, 1, True)
    for kind in ("loha", "lokr", "dora"):
        extra = job_mem_mb(tiny_sd, 512, 1, True, network_type=kind) - lora
        assert extra == pytest.approx(weights_mb * NETWORK_TYPE_MEMORY[kind], abs=1) and extra > 0
        assert job_mem_mb(tiny_sd, 512, 1, False, network_type=kind) == job_mem_mb(
            tiny_sd, 512, 1, False
        )
