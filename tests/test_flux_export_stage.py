"""The export stage on Flux.1 and Chroma (loramill.export.flux): tiny FLUX.1 [dev] (CLIP-L
trained too) and Chroma runs exported by the export job, their files' names, labels and card;
the diffusers file in FluxPipeline drawing what the kohya file draws through ComfyUI's rules;
diffusers reading the kohya file at FLUX.1's full width; and each check refusing the file it
exists for."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
from conftest import linears, render, train_recorded
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loramill import LoramillError
from loramill.export.flux.client_rules import CLIP_L, comfyui_flux_load, fused_deltas
from loramill.export.flux.verify import load_flux_base, verify_flux_exports
from loramill.export.flux.write import FluxBase
from loramill.export.job import export_and_verify
from loramill.export.write import export_adapter
from loramill.models.base_model import load_pipeline
from loramill.models.checkpoint import ADAPTER_METADATA_KEY, read_checkpoint, save_checkpoint
from loramill.models.flux.layout import bfl_modules, row_slices
from loramill.models.network import NetworkSpec, add_lora

FLUX = {"t5xxl_max_token_length": 16, "timestep_sampling": "shift"}
KOHYA_FLUX_KEY = re.compile(
    r"^lora_(unet|te1)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$"
)
QKV = "lora_unet_double_blocks_0_img_attn_qkv"
# tiny FLUX.1: 2 double blocks × 14 diffusers modules + 2 single × 6; CLIP-L 2 layers × 6
MODULES = "40 transformer modules, 12 text_encoder modules"


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


def recorded(call) -> list[str]:
    """The loramill log lines ``call()`` writes."""
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    logger, level = logging.getLogger("loramill"), logging.getLogger("loramill").level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        call()
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return lines


def export_job(prepared, base: Path, config: dict, out: Path) -> tuple[dict, list[str]]:
    """Train on ``base`` (~2 s), then run the export job as the workflow does (its train
    settings: the run's own)."""
    written, _ = train_recorded(prepared, out, str(base), config, cache_root=out / "cache")
    train = json.loads(read_checkpoint(written[-1]).metadata["loramill.provenance"])
    paths = {"kohya": out / "exports" / "x.safetensors", "steps": out / "exports" / "x-steps"}
    paths |= {"diffusers": out / "exports" / "x.diffusers.safetensors"}
    paths |= {"card": out / "exports" / "x.md", "checkpoints": out / "checkpoints"}
    lines = recorded(lambda: export_and_verify(
        paths["checkpoints"], paths["kohya"], paths["diffusers"], paths["card"], paths["steps"],
        "x", {"save_precision": "fp32"}, str(base), False, train["train_config"],
    ))  # fmt: skip
    return paths, lines


@pytest.fixture(scope="module")
def flux_job(prepared, tiny_flux, tmp_path_factory):
    config = {**FLUX, "train_text_encoder": True}
    return export_job(prepared, tiny_flux, config, tmp_path_factory.mktemp("flux-export"))


@pytest.fixture(scope="module")
def chroma_job(prepared, tiny_chroma, tmp_path_factory):
    return export_job(prepared, tiny_chroma, FLUX, tmp_path_factory.mktemp("chroma-export"))


def test_the_export_job_writes_and_verifies_every_flux_file(flux_job):
    paths, lines = flux_job
    steps = sorted(p.name for p in paths["steps"].iterdir())
    assert steps == ["x-000004.safetensors", "x-000006.safetensors"]
    # diffusers' kohya converter splits single blocks at FLUX.1's sizes: not this model's
    assert "not FLUX.1's width: the kohya files' load in diffusers is not checked" in lines
    for path in (paths["kohya"], *(paths["steps"] / s for s in steps)):
        assert f"{path}: {MODULES} at the trained scale in ComfyUI, kohya sd-scripts" in lines
    assert f"{paths['diffusers']}: {MODULES} at the trained scale in diffusers, ComfyUI" in lines

    meta = metadata_of(paths["kohya"])
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert (meta["ss_base_model_version"], meta["ss_model_type"]) == ("flux1", "flux")
    assert meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_steps"]) == ("4", "2.0", "6")
    assert (meta["ss_timestep_sampling"], meta["ss_discrete_flow_shift"]) == ("shift", "3.0")
    assert meta["ss_apply_t5_attn_mask"] == "False"  # kohya's default on FLUX.1
    assert meta["ss_v2"] == "False" and "ss_network_args" not in meta  # train_blocks all
    diffusers_meta = metadata_of(paths["diffusers"])
    assert diffusers_meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert diffusers_meta["modelspec.implementation"] == "https://github.com/huggingface/diffusers"
    assert metadata_of(paths["steps"] / steps[0])["ss_steps"] == "4"
    card = paths["card"].read_text()
    assert "(flux-1-dev/lora), trained by loramill for 6 steps" in card
    assert "LoraLoaderModelOnly" in card and "AUTOMATIC1111" not in card
    assert "| timestep_sampling | shift |" in card and "| clip_skip |" not in card  # SD's
    assert f"`{meta['sshs_model_hash']}`" in card
    assert paths["card"].with_suffix(".html").exists()


def test_flux_keys_are_kohyas_bfl_names_and_diffusers_module_names(flux_job):
    paths, _ = flux_job
    kohya = load_file(str(paths["kohya"]))
    assert all(KOHYA_FLUX_KEY.match(key) for key in kohya)
    # 2 × 10 + 2 × 3 BFL modules and CLIP-L's 12, each down, up and alpha
    assert len(kohya) == 3 * (26 + 12)
    assert kohya[f"{QKV}.lora_down.weight"].shape == (3 * 4, 16)  # q, k, v side by side
    assert kohya[f"{QKV}.alpha"] == 3 * 2.0  # alpha / rank: the trained 2 / 4
    assert kohya["lora_unet_single_blocks_1_linear1.alpha"] == 4 * 2.0
    assert "lora_te1_text_model_encoder_layers_1_self_attn_q_proj.alpha" in kohya
    diffusers = load_file(str(paths["diffusers"]))
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in diffusers
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc2.lora_B.weight" in diffusers
    assert len(diffusers) == 2 * (40 + 12)
    adapters = json.loads(metadata_of(paths["diffusers"])[ADAPTER_METADATA_KEY])
    assert adapters["transformer.lora_alpha"] == adapters["transformer.r"] == 4  # scale in B


def test_chroma_exports_its_blocks_without_modulation_and_its_labels(chroma_job):
    paths, lines = chroma_job
    kohya = load_file(str(paths["kohya"]))
    assert len(kohya) == 3 * (2 * 8 + 2 * 2)
    assert not any("_mod_" in key or "modulation" in key or "lora_te" in key for key in kohya)
    modules = "34 transformer modules at the trained scale in"
    assert f"{paths['kohya']}: {modules} ComfyUI, kohya sd-scripts" in lines
    assert f"{paths['diffusers']}: {modules} diffusers, ComfyUI" in lines
    meta = metadata_of(paths["kohya"])
    assert (meta["ss_base_model_version"], meta["ss_model_type"]) == ("chroma", "chroma")
    assert meta["ss_apply_t5_attn_mask"] == "True"  # as kohya requires for Chroma
    assert meta["modelspec.architecture"] == "chroma/lora"
    assert meta["modelspec.implementation"] == "https://huggingface.co/lodestones/Chroma"


def merge_as_comfyui(pipe, tensors: dict) -> None:
    """The kohya file applied to the pipeline's weights by ComfyUI's rules: each BFL module's
    delta split back onto diffusers' modules by rows, CLIP-L's added to its layers."""
    config, found = dict(pipe.transformer.config), linears(pipe.transformer)
    sizes = {name: layer.out_features for name, layer in found.items()}
    layers = pipe.text_encoder.config.num_hidden_layers
    applied, unread = comfyui_flux_load(tensors, config, sizes, layers)
    assert unread == []
    fused = bfl_modules(config)
    shapes = {bfl: (sum(sizes[p] for p in parts), found[parts[0]].in_features)
              for bfl, parts in fused.items()}  # fmt: skip
    text = {t: applied.pop(t) for t in list(applied) if t.startswith(CLIP_L)}
    clip = linears(pipe.text_encoder)
    with torch.no_grad():
        for bfl, delta in fused_deltas(applied, shapes).items():
            for part, rows in row_slices(sizes, fused[bfl]).items():
                found[part].weight += delta[rows]
        for target, (up, down, scale) in text.items():
            clip[target.removeprefix(CLIP_L + "text_model.")].weight += scale * up @ down


def test_the_diffusers_file_in_fluxpipeline_draws_what_comfyui_draws_of_the_kohya_file(
    flux_job, tiny_flux
):
    paths, _ = flux_job
    pipe = load_pipeline(str(tiny_flux))
    base = render(pipe)
    pipe.load_lora_weights(str(paths["diffusers"]), adapter_name="diffusers")
    pipe.set_adapters("diffusers", adapter_weights=0.0)
    assert torch.equal(render(pipe), base)
    pipe.set_adapters("diffusers", adapter_weights=1.0)
    with_diffusers = render(pipe)
    assert (with_diffusers - base).abs().max() > 1e-3
    comfyui = load_pipeline(str(tiny_flux))
    merge_as_comfyui(comfyui, load_file(str(paths["kohya"])))
    torch.testing.assert_close(render(comfyui), with_diffusers, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def flux_base(tiny_flux):
    """The tiny FLUX.1 as the export job loads it to verify: transformer and CLIP-L."""
    return load_flux_base(str(tiny_flux), False, ("text_encoder",))


def edited(source: Path, out: Path, change) -> Path:
    """``source`` rewritten with ``change`` applied to its tensors and metadata."""
    tensors, metadata = load_file(str(source)), metadata_of(source)
    change(tensors, metadata)
    save_file(tensors, str(out), metadata)
    return out


def renamed(old: str, new: str):
    def change(tensors, metadata):
        for key in [k for k in tensors if old in k]:
            tensors[key.replace(old, new)] = tensors.pop(key)

    return change


def doubled_alpha(tensors, metadata):
    tensors[f"{QKV}.alpha"] = tensors[f"{QKV}.alpha"] * 2


def dropped_up(tensors, metadata):
    del tensors["lora_unet_single_blocks_1_linear1.lora_up.weight"]


def with_t5(tensors, metadata):
    stem = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"  # kohya's T5 name
    tensors |= {f"{stem}.lora_down.weight": torch.ones(4, 32),
                f"{stem}.lora_up.weight": torch.ones(32, 4)}  # fmt: skip


def unscaled_metadata(tensors, metadata):
    """alpha = 2·rank in the adapter metadata: diffusers would apply the scale twice."""
    adapters = json.loads(metadata[ADAPTER_METADATA_KEY])
    adapters["transformer.lora_alpha"] = 2 * adapters["transformer.r"]
    metadata[ADAPTER_METADATA_KEY] = json.dumps(adapters)


@pytest.mark.parametrize(
    ("file", "change", "message"),
    [
        ("kohya", doubled_alpha, r"ComfyUI applies double_blocks\.0\.img_attn\.qkv at 2× the"),
        ("kohya", dropped_up, r"ComfyUI would not load 2 keys \(first: lora_unet_single_blocks_1_"),
        ("kohya", renamed(QKV, f"{QKV[:-1]}w"), r": 38 transformer LoRA modules; .*40$"),
        # diffusers' kohya converter drops T5 keys with a warning; the count refuses them
        ("kohya", with_t5, r": 1 text_encoder_2 LoRA modules; network_target kohya .* has 0$"),
        ("diffusers", unscaled_metadata, r"diffusers applies transformer\.\S+ at 2× the trained"),
        # a module the model lacks: diffusers warns of unexpected keys and loads the rest
        (
            "diffusers",
            renamed("single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.7.proj_mlp"),
            r"diffusers left 1 transformer LoRA modules unloaded and made 0 it does not hold "
            r"\(first: single_transformer_blocks\.7\.proj_mlp\)",
        ),
    ],
)
def test_a_file_any_client_would_misload_is_refused(
    flux_job, flux_base, tmp_path, file, change, message
):
    paths, _ = flux_job
    bad = edited(paths[file], tmp_path / "bad.safetensors", change)
    source = sorted(paths["checkpoints"].iterdir())[-1]
    with pytest.raises(LoramillError, match=message):
        verify_flux_exports(
            {bad: source}, flux_base, {"transformer", "text_encoder"}, "kohya", "all"
        )


def test_the_wrong_network_or_strength_zero_is_refused(flux_job, flux_base, monkeypatch):
    paths, _ = flux_job
    source, trained = sorted(paths["checkpoints"].iterdir())[-1], {"transformer", "text_encoder"}
    kohya = {paths["kohya"]: source}
    with pytest.raises(LoramillError, match=r"40 transformer .* \(train_blocks double\) .* 28$"):
        verify_flux_exports(kohya, flux_base, trained, "kohya", "double")
    with pytest.raises(LoramillError, match=r"12 text_encoder LoRA modules; .* has 0$"):
        verify_flux_exports(kohya, flux_base, {"transformer"}, "kohya", "all")
    transformer = type(flux_base.transformer)
    monkeypatch.setattr(transformer, "set_adapters", lambda self, names, weights: None)
    with pytest.raises(LoramillError, match=r"at strength 0 the transformer's output is not the"):
        verify_flux_exports({paths["diffusers"]: source}, flux_base, trained, "kohya", "all")


def test_a_t5_lora_is_refused_rather_than_exported_without_it(flux_job, tiny_flux, tmp_path):
    paths, _ = flux_job
    source = sorted(paths["checkpoints"].iterdir())[-1]
    extra = {f"text_encoder_2.encoder.block.0.layer.0.SelfAttention.q.lora_{p}.weight":
             torch.ones(4, 4) for p in "AB"}  # fmt: skip
    bad = edited(source, tmp_path / "step-000001.safetensors", lambda t, m: t.update(extra))
    out = [tmp_path / "k.safetensors", tmp_path / "d.safetensors"]
    with pytest.raises(LoramillError, match=r"'text_encoder_2' LoRA tensors: kohya's flux export"):
        export_adapter(bad, *out, "x", flux=FluxBase.of(load_flux_base(str(tiny_flux), False, ())))
    assert not any(path.exists() for path in out)


def full_width_flux():
    """FLUX.1 [dev]'s transformer at full width with one block of each kind (545 M
    parameters), weights tiled from one small random block (PyTorch's init of each layer is
    most of the cost otherwise), in a pipeline with the tiny CLIP-L and nothing else."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from loramill.demo.full_size import FLUX_DEV
    from loramill.demo.tiny_flux import FLUX_NOISE, TINY_FLUX
    from loramill.demo.tiny_models import CLIP_TEXT

    with init_empty_weights():
        transformer = FluxTransformer2DModel(
            **{**FLUX_DEV, "num_layers": 1, "num_single_layers": 1}
        )
    transformer.register_to_config(_class_name="FluxTransformer2DModel")  # as a folder's has it
    block = torch.randn(4099, generator=torch.Generator().manual_seed(0)) * 0.02
    for name, param in list(transformer.named_parameters()):
        tiled = block.repeat(-(-param.numel() // block.numel()))[: param.numel()]
        set_module_tensor_to_device(transformer, name, "cpu", value=tiled.view(param.shape))
    torch.manual_seed(0)
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, **TINY_FLUX["text_encoder"]))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_NOISE), vae=None, text_encoder=clip,
        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
    )  # fmt: skip


def test_at_flux1s_width_diffusers_loads_the_kohya_file_at_the_trained_scale(tmp_path):
    """diffusers' kohya converter takes each fused module apart (the block-diagonal lora_up)
    and CLIP-L's lora_te1_ keys: every module lands, at the trained delta, strength 0 = base."""
    pipe = full_width_flux()
    models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    add_lora(models, NetworkSpec("kohya", 4, 2.0), init=False)  # lora_B ≠ 0
    provenance = {"family": "flux", "base_version": "flux1", "base_model": "full"}
    checkpoint = tmp_path / "step-000001.safetensors"
    save_checkpoint(checkpoint, models, {"loramill.provenance": json.dumps(provenance)})
    pipe.transformer.delete_adapters("default")  # back to the base model
    pipe.text_encoder.delete_adapter("default")
    paths = [tmp_path / "full.safetensors", tmp_path / "full.diffusers.safetensors"]
    export_adapter(checkpoint, *paths, "full", flux=FluxBase.of(pipe))
    lines = recorded(lambda: verify_flux_exports(
        dict.fromkeys(paths, checkpoint), pipe, set(models), "kohya", "all"
    ))  # fmt: skip
    modules = "20 transformer modules, 12 text_encoder modules at the trained scale in"
    assert f"{paths[0]}: {modules} diffusers, ComfyUI, kohya sd-scripts" in lines
    assert f"{paths[1]}: {modules} diffusers, ComfyUI" in lines


# ---------------------------------------------------------------- init_from a kohya Flux file


def _network_models(base: Path, text: bool) -> tuple[dict, NetworkSpec]:
    """The tiny model's components with the run's network (FLUX's rank and alpha) on them."""
    from loramill.train.config import TrainConfig

    pipe = load_pipeline(str(base))
    models = {"transformer": pipe.transformer} | (
        {"text_encoder": pipe.text_encoder} if text else {}
    )
    spec = TrainConfig.from_dict({**FLUX, "rank": 4, "alpha": 2}).network
    add_lora(models, spec)
    return models, spec


def test_init_from_reads_the_kohya_export_back_into_the_trained_tensors(flux_job, tiny_flux):
    from loramill.train.init_from import read_init_weights

    paths, _ = flux_job
    models, spec = _network_models(tiny_flux, text=True)
    tensors = read_init_weights(paths["kohya"], models, spec)
    trained = read_checkpoint(paths["checkpoints"] / "step-000006.safetensors").tensors
    assert tensors.keys() == trained.keys()
    assert all(torch.equal(tensors[key], trained[key]) for key in trained)


def test_init_from_splits_kohya_sd_scripts_shared_down_and_refuses_another_scale_or_t5(
    tiny_flux, tmp_path
):
    from loramill.train.init_from import read_init_weights

    models, spec = _network_models(tiny_flux, text=False)
    transformer, generator = models["transformer"], torch.Generator().manual_seed(0)
    tensors = {}
    for bfl, parts in bfl_modules(transformer.config).items():
        stem = "lora_unet_" + bfl.replace(".", "_")
        rows = sum(transformer.get_submodule(p).base_layer.out_features for p in parts)
        width = transformer.get_submodule(parts[0]).base_layer.in_features
        tensors[f"{stem}.lora_down.weight"] = torch.randn(4, width, generator=generator)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(rows, 4, generator=generator)
        tensors[f"{stem}.alpha"] = torch.tensor(2.0)
    save_file(tensors, tmp_path / "kohya.safetensors")
    read = read_init_weights(tmp_path / "kohya.safetensors", models, spec)
    down = tensors[f"{QKV}.lora_down.weight"]
    parts = [f"transformer.transformer_blocks.0.attn.to_{p}" for p in "qkv"]
    assert all(torch.equal(read[f"{p}.lora_A.weight"], down) for p in parts)  # one shared down
    up = torch.cat([read[f"{p}.lora_B.weight"] for p in parts])
    assert torch.equal(up, tensors[f"{QKV}.lora_up.weight"])
    tensors[f"{QKV}.alpha"] = torch.tensor(4.0)
    save_file(tensors, tmp_path / "other.safetensors")
    with pytest.raises(LoramillError, match=f"'{QKV}': rank 4, alpha 4 over 3 part"):
        read_init_weights(tmp_path / "other.safetensors", models, spec)
    tensors[f"{QKV}.alpha"] = torch.tensor(2.0)
    t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q"  # kohya's name for a T5 module
    tensors |= {
        f"{t5}.lora_down.weight": torch.zeros(4, 32),
        f"{t5}.lora_up.weight": torch.zeros(32, 4),
    }
    save_file(tensors, tmp_path / "t5.safetensors")
    with pytest.raises(LoramillError, match=f"has T5 layers \\('{t5}'\\); loramill does not train"):
        read_init_weights(tmp_path / "t5.safetensors", models, spec)
