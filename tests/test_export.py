"""Exports load completely in real consumers, keep alpha, and are reproducible byte for byte."""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from conftest import (
    SAMPLE_PROVENANCE,
    assert_kohya_and_diffusers_agree,
    digest,
    make_random_checkpoint,
    render,
)
from safetensors import safe_open
from safetensors.torch import load_file, save, save_file

from loramill import LoramillError
from loramill.export.metadata import data_hash
from loramill.export.write import export_adapter, to_kohya
from loramill.models.base_model import load_pipeline
from loramill.models.checkpoint import ADAPTER_METADATA_KEY, Checkpoint, read_checkpoint
from loramill.models.network import NetworkSpec, add_lora

KOHYA_KEY = re.compile(r"^lora_(unet|te)_[a-z0-9_]+\.(lora_down\.weight|lora_up\.weight|alpha)$")
# The tiny model: 4 transformer blocks (1 down, 1 mid, 2 up) x 2 attentions x 4 projections
# in the UNet, 2 CLIP layers x 4 projections in the text encoder.
TINY_UNET_MODULES, TINY_TE_MODULES = 32, 8


def metadata_of(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata())


@pytest.fixture(scope="module")
def exported(random_checkpoint, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("export")
    paths = {"kohya": out / "sample.safetensors", "diffusers": out / "sample.diffusers.safetensors"}
    export_adapter(random_checkpoint, paths["kohya"], paths["diffusers"], "sample")
    return paths


@pytest.mark.parametrize("kind", ["kohya", "diffusers"])
def test_every_module_loads_into_diffusers_at_the_trained_scale(
    kind, exported, random_checkpoint, tiny_sd
):
    """diffusers' own loader: every trained module gets a layer that applies the trained
    delta, alpha / rank · B @ A. The kohya file by its alpha (2 / 4); the diffusers file with
    the scale in its weights and alpha = rank, the one alpha ComfyUI reads from it too."""
    from peft.tuners.lora import LoraLayer

    checkpoint = read_checkpoint(random_checkpoint)
    pipe = load_pipeline(tiny_sd)
    pipe.load_lora_weights(str(exported[kind]), adapter_name="x")
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        trained = checkpoint.component(component)
        assert {f"{n}.lora_A.weight" for n in layers} == {k for k in trained if "lora_A" in k}
        for name, layer in layers.items():
            applied = layer.scaling["x"] * layer.lora_B["x"].weight @ layer.lora_A["x"].weight
            want = 0.5 * trained[f"{name}.lora_B.weight"] @ trained[f"{name}.lora_A.weight"]
            torch.testing.assert_close(applied, want, rtol=1e-6, atol=1e-7)
        config = model.peft_config["x"]
        alpha = 2.0 if kind == "kohya" else 4.0
        assert (config.r, config.lora_alpha, config.alpha_pattern) == (4, alpha, {})


def test_strength_zero_is_base_and_both_formats_agree(exported, tiny_sd):
    pipe = load_pipeline(tiny_sd)
    base = render(pipe)
    pipe.load_lora_weights(str(exported["kohya"]), adapter_name="kohya")
    pipe.load_lora_weights(str(exported["diffusers"]), adapter_name="diffusers")

    assert_kohya_and_diffusers_agree(pipe, base)


def test_kohya_alpha_is_the_trained_alpha_not_the_rank(exported):
    tensors = load_file(str(exported["kohya"]))
    alphas = {k: v for k, v in tensors.items() if k.endswith(".alpha")}
    assert len(alphas) == TINY_UNET_MODULES + TINY_TE_MODULES
    for key, alpha in alphas.items():
        assert alpha.shape == () and alpha.item() == 2.0, key
        assert tensors[key.replace(".alpha", ".lora_down.weight")].shape[0] == 4


def test_alpha_above_rank_survives(tmp_path):
    source = make_random_checkpoint(tmp_path / "ckpt.safetensors", rank=2, alpha=8.0, seed=1)
    export_adapter(source, tmp_path / "k.safetensors", tmp_path / "d.safetensors", "big-alpha")
    tensors = load_file(str(tmp_path / "k.safetensors"))
    assert {v.item() for k, v in tensors.items() if k.endswith(".alpha")} == {8.0}
    meta = metadata_of(tmp_path / "k.safetensors")
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("2", "8.0")


def test_kohya_key_naming_and_counts(exported, random_checkpoint):
    checkpoint = read_checkpoint(random_checkpoint)
    tensors = load_file(str(exported["kohya"]))
    assert all(KOHYA_KEY.match(key) for key in tensors), [
        k for k in tensors if not KOHYA_KEY.match(k)
    ]
    te_keys = [k for k in tensors if k.startswith("lora_te_")]
    assert te_keys and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te_keys)

    modules = {
        k.rsplit(".", 2)[0] if k.endswith(".weight") else k[: -len(".alpha")] for k in tensors
    }
    unet = {m for m in modules if m.startswith("lora_unet_")}
    assert (len(unet), len(modules - unet)) == (TINY_UNET_MODULES, TINY_TE_MODULES)
    for module in modules:
        for suffix in ("lora_down.weight", "lora_up.weight", "alpha"):
            assert f"{module}.{suffix}" in tensors
    assert len(tensors) == 3 * len(modules) == 3 * len(checkpoint.tensors) // 2

    pairs = {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
        ),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight": (
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.lora_B.weight"
        ),
        "lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_up.weight": (
            "text_encoder.encoder.layers.1.self_attn.v_proj.lora_B.weight"
        ),
    }
    for kohya_key, checkpoint_key in pairs.items():
        assert torch.equal(tensors[kohya_key], checkpoint.tensors[checkpoint_key]), kohya_key


def test_real_sd15_architecture_names():
    """Full-size SD1.5 module tree on the meta device: real kohya names, real counts."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from peft.utils import get_peft_model_state_dict
    from transformers import CLIPTextConfig, CLIPTextModel

    from loramill.demo.full_size import SD15
    from loramill.demo.tiny_models import CLIP_TEXT

    with init_empty_weights():
        unet = UNet2DConditionModel(**SD15["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, **SD15["text_encoder"]))
    add_lora(
        {"unet": unet, "text_encoder": text_encoder}, NetworkSpec("attention", rank=4, alpha=2.0)
    )
    tensors, configs = {}, {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder)):
        # Meta tensors carry shapes but no data; small zeros stand in for the weights.
        for key, value in get_peft_model_state_dict(model).items():
            tensors[f"{name}.{key}"] = torch.zeros(value.shape)
        configs[name] = model.peft_config["default"].to_dict()
    kohya = to_kohya(Checkpoint(tensors=tensors, metadata={}, adapter_configs=configs))

    for key in (
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
        "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight",
        "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k.lora_down.weight",
        "lora_te_text_model_encoder_layers_11_self_attn_v_proj.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_out_proj.lora_up.weight",
    ):
        assert key in kohya, key
    alphas = [k for k in kohya if k.endswith(".alpha")]
    assert sum(k.startswith("lora_unet_") for k in alphas) == 128
    assert sum(k.startswith("lora_te_text_model_encoder_layers_") for k in alphas) == 48
    assert len(kohya) == 3 * (128 + 48)
    assert all(KOHYA_KEY.match(k) for k in kohya)


def test_export_is_byte_identical_and_metadata_is_kohya_style(
    random_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    first = (tmp_path / "a.safetensors", tmp_path / "a.diffusers.safetensors")
    second = (tmp_path / "b.safetensors", tmp_path / "b.diffusers.safetensors")
    export_adapter(random_checkpoint, *first, "sample")
    export_adapter(random_checkpoint, *second, "sample")
    for one, two in zip(first, second, strict=True):
        assert digest(one) == digest(two), one.name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in first + second)

    meta = metadata_of(first[0])
    assert meta["ss_output_name"] == "sample" == meta["modelspec.title"]
    assert meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_network_module"] == "networks.lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "2.0")
    assert json.loads(meta["ss_tag_frequency"]) == {"sample": SAMPLE_PROVENANCE["tag_frequency"]}
    assert meta["ss_seed"] == "7"
    assert meta["ss_num_train_images"] == "3"
    assert meta["ss_max_train_steps"] == "1"
    assert float(meta["ss_learning_rate"]) == 1e-4
    assert meta["ss_resolution"] == "(64, 64)" and meta["modelspec.resolution"] == "64x64"
    assert meta["ss_sd_model_name"] == "tiny-sd"
    # A1111's model hashes are of a single checkpoint file; a diffusers folder has none, and
    # its loramill hash (in the provenance) would match nothing A1111 shows
    assert "ss_new_sd_model_hash" not in meta and "ss_sd_model_hash" not in meta
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert meta["modelspec.implementation"] == "https://github.com/huggingface/diffusers"
    assert meta["modelspec.date"] == "2023-11-14"  # the day of SOURCE_DATE_EPOCH, in UTC
    assert not any("time" in key for key in meta)
    assert json.loads(meta["loramill.provenance"]) == SAMPLE_PROVENANCE
    assert meta["loramill.step"] == "1"

    diffusers_meta = metadata_of(first[1])
    source_meta = read_checkpoint(random_checkpoint).metadata
    assert diffusers_meta["ss_network_alpha"] == "2.0"
    assert diffusers_meta["loramill.provenance"] == source_meta["loramill.provenance"]
    diffusers_tensors = load_file(str(first[1]))
    checkpoint_tensors = load_file(str(random_checkpoint))
    # UNet: the attention-processor spelling ComfyUI maps and diffusers converts; text encoder:
    # transformers 4's path (diffusers strips it for transformers 5); lora_B × alpha / rank
    q = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    renamed = {
        f"unet.{q}.processor.to_q_lora.down.weight": f"unet.{q}.to_q.lora_A.weight",
        f"unet.{q}.processor.to_out_lora.up.weight": f"unet.{q}.to_out.0.lora_B.weight",
        "text_encoder.text_model.encoder.layers.1.self_attn.v_proj.lora_B.weight": (
            "text_encoder.encoder.layers.1.self_attn.v_proj.lora_B.weight"
        ),
    }
    assert len(diffusers_tensors) == len(checkpoint_tensors)
    for key, source in renamed.items():
        scale = 0.5 if "lora_B" in source else 1.0
        assert torch.equal(diffusers_tensors[key], checkpoint_tensors[source] * scale), key


# LoraConfig's fields in peft 0.20.0 (read from that release's dataclass), which refuses any
# other: the diffusers file must load on transformers 4 stacks.
PEFT_0_20_FIELDS = {
    "alora_invocation_tokens", "alpha_pattern", "arrow_config", "auto_mapping",
    "base_model_name_or_path", "bias", "corda_config", "ensure_weight_tying", "eva_config",
    "exclude_modules", "fan_in_fan_out", "inference_mode", "init_lora_weights",
    "layer_replication", "layers_pattern", "layers_to_transform", "loftq_config", "lora_alpha",
    "lora_bias", "lora_dropout", "lora_ga_config", "megatron_config", "megatron_core",
    "modules_to_save", "monteclora_config", "peft_type", "peft_version", "qalora_group_size",
    "r", "rank_pattern", "revision", "runtime_config", "target_modules", "target_parameters",
    "task_type", "trainable_token_indices", "use_bdlora", "use_dora", "use_qalora",
    "use_rslora", "velora_config",
}  # fmt: skip


def test_diffusers_adapter_metadata_is_what_older_peft_accepts(exported, random_checkpoint):
    packed = json.loads(metadata_of(exported["diffusers"])[ADAPTER_METADATA_KEY])
    fields = {key.partition(".")[2] for key in packed}
    assert fields <= PEFT_0_20_FIELDS
    assert {"r", "lora_alpha", "target_modules"} <= fields
    source = read_checkpoint(random_checkpoint).adapter_configs
    assert "kasa_config" in source["unet"]  # what peft 0.21 writes and 0.20 refuses
    for component, config in source.items():
        # alpha = rank: the trained scale is in the weights (ComfyUI reads no other alpha)
        assert packed[f"{component}.lora_alpha"] == config["r"] == 4
        assert packed[f"{component}.alpha_pattern"] == config["rank_pattern"]
        for field in fields - {"lora_alpha", "alpha_pattern"}:
            assert packed[f"{component}.{field}"] == config[field]


def test_save_precision_casts_weights_not_alphas(random_checkpoint, tmp_path):
    paths = (tmp_path / "h.safetensors", tmp_path / "h.diffusers.safetensors")
    export_adapter(random_checkpoint, *paths, "half", save_precision="fp16")
    kohya, diffusers = load_file(str(paths[0])), load_file(str(paths[1]))
    assert {t.dtype for k, t in kohya.items() if not k.endswith(".alpha")} == {torch.float16}
    assert {t.dtype for k, t in kohya.items() if k.endswith(".alpha")} == {torch.float32}
    assert {t.dtype for t in diffusers.values()} == {torch.float16}
    with pytest.raises(LoramillError, match=r"export\.save_precision 'fp8': use fp32 \| fp16"):
        export_adapter(random_checkpoint, *paths, "half", save_precision="fp8")


def kohya_hashes(path: Path) -> tuple[str, str]:
    """A1111 / kohya definitions, computed from the file on disk.

    Model hash: sha256 of everything after the 8-byte length and the JSON header. Legacy
    hash: first 8 hex of sha256 of 64 KiB at offset 1 MiB of the same tensors saved with
    only the ``ss_*`` metadata.
    """
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length :]).hexdigest()
    training = {k: v for k, v in metadata_of(path).items() if k.startswith("ss_")}
    resaved = save(load_file(str(path)), metadata=training)
    legacy_hash = hashlib.sha256(resaved[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def test_sshs_hashes_match_their_definition(exported, tmp_path):
    # A module wide enough that the file passes 1.1 MiB, so the legacy hash reads real bytes.
    module = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    generator = torch.Generator().manual_seed(3)
    tensors = {
        f"{module}.lora_A.weight": torch.randn(4, 40_000, generator=generator),
        f"{module}.lora_B.weight": torch.randn(40_000, 4, generator=generator),
    }
    configs = {"unet.r": 4, "unet.lora_alpha": 2}
    header = {
        ADAPTER_METADATA_KEY: json.dumps(configs),
        "loramill.provenance": json.dumps(SAMPLE_PROVENANCE),
        "loramill.step": "5",
    }
    save_file(tensors, str(tmp_path / "ckpt.safetensors"), metadata=header)
    big = (tmp_path / "big.safetensors", tmp_path / "big.diffusers.safetensors")
    export_adapter(tmp_path / "ckpt.safetensors", *big, "big")
    assert big[0].stat().st_size > 0x110000

    for path in (*big, *exported.values()):
        meta = metadata_of(path)
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_hashes(path), path
    assert metadata_of(big[0])["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    assert metadata_of(big[0])["ss_steps"] == "5"


def write_checkpoint(path: Path, source: Path, extra: dict[str, torch.Tensor]) -> Path:
    tensors = load_file(str(source))
    tensors.update(extra)
    save_file(tensors, str(path), metadata=metadata_of(source))
    return path


@pytest.mark.parametrize(
    "bogus",
    [
        "unet.bogus.weight",
        "vae.decoder.conv_in.lora_A.weight",
        "unet.down_blocks.0.attentions.0.proj_in.lora_A.weight",  # no lora_B partner
        "text_encoder.encoder.layers.0.self_attn.q_proj.lora_B.bias",
    ],
)
def test_unmappable_key_is_refused_by_name(bogus, random_checkpoint, tmp_path):
    source = write_checkpoint(
        tmp_path / "ckpt.safetensors", random_checkpoint, {bogus: torch.ones(4, 4)}
    )
    kohya, diffusers = tmp_path / "k.safetensors", tmp_path / "d.safetensors"
    with pytest.raises(LoramillError, match=re.escape(bogus)):
        export_adapter(source, kohya, diffusers, "sample")
    assert not kohya.exists() and not diffusers.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors"]


def test_colliding_module_names_are_refused():
    tensors = {
        f"unet.{module}.lora_{part}.weight": torch.ones(1, 1)
        for module in ("a_b.c", "a.b_c")
        for part in "AB"
    }
    checkpoint = Checkpoint(tensors, {}, {"unet": {"r": 1, "lora_alpha": 1}})
    with pytest.raises(LoramillError, match="a_b_c"):
        to_kohya(checkpoint)


def test_text_model_level_is_not_doubled():
    """Checkpoints from transformers 4 (with ``text_model.``) give the same kohya names."""
    tensors = {
        f"text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_{p}.weight": torch.ones(
            1, 1
        )
        for p in "AB"
    }
    checkpoint = Checkpoint(tensors, {}, {"text_encoder": {"r": 1, "lora_alpha": 1}})
    assert sorted(to_kohya(checkpoint)) == [
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight",
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight",
    ]


@pytest.mark.parametrize(
    ("base_version", "labels"),
    [
        ("sd_v2-v", ("sd_v2", "True", "stable-diffusion-v2-768-v/lora")),
        ("sd_v2", ("sd_v2", "True", "stable-diffusion-v2-512/lora")),
        ("sd_v1", ("sd_v1", "False", "stable-diffusion-v1/lora")),
    ],
)
def test_the_base_version_trained_on_labels_the_export(
    random_checkpoint, tmp_path, base_version, labels
):
    # the session's checkpoint, read only: a copy of it says which base it was trained on
    with safe_open(str(random_checkpoint), "pt") as handle:
        metadata, tensors = handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    provenance = {**json.loads(metadata["loramill.provenance"]), "base_version": base_version}
    save_file(
        tensors,
        tmp_path / "c.safetensors",
        {**metadata, "loramill.provenance": json.dumps(provenance)},
    )
    export_adapter(
        tmp_path / "c.safetensors", tmp_path / "k.safetensors", tmp_path / "d.safetensors", "x"
    )
    meta = metadata_of(tmp_path / "k.safetensors")
    assert (meta["ss_base_model_version"], meta["ss_v2"], meta["modelspec.architecture"]) == labels


def test_base_version_comes_from_the_model_config(tiny_sd):
    from types import SimpleNamespace

    from loramill.models.base_model import pipeline_family

    def base_version(pipe):
        return pipeline_family(pipe).version(pipe)

    assert base_version(load_pipeline(tiny_sd)) == "sd_v1"

    from diffusers.configuration_utils import FrozenDict  # what a model's .config is

    def pipe(width, prediction):
        unet = SimpleNamespace(config=FrozenDict(cross_attention_dim=width))
        return SimpleNamespace(
            unet=unet, scheduler=SimpleNamespace(config={"prediction_type": prediction})
        )

    assert base_version(pipe(768, "epsilon")) == "sd_v1"
    assert base_version(pipe(1024, "epsilon")) == "sd_v2"
    assert base_version(pipe(1024, "v_prediction")) == "sd_v2-v"


def test_training_fields_in_kohya_metadata():
    from loramill.export.metadata import kohya_metadata

    train_config = {
        "network_target": "kohya_conv", "rank": 8, "alpha": 4, "conv_rank": None,
        "conv_alpha": 1.0, "rank_dropout": 0.1, "module_dropout": 0.0, "network_dropout": 0.05,
        "learning_rate": 1e-4, "unet_lr": 2e-4, "text_encoder_lr": 5e-5,
        "gradient_accumulation_steps": 2, "max_train_epochs": 5,
    }  # fmt: skip
    provenance = {**SAMPLE_PROVENANCE, "train_config": train_config, "batches_per_epoch": 5}
    metadata = {"loramill.provenance": json.dumps(provenance), "loramill.step": "12"}
    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(8, 2)}
    meta = kohya_metadata(
        Checkpoint({}, metadata, {"unet": {"r": 8, "lora_alpha": 4}}), tensors, "x"
    )
    assert meta["ss_epoch"] == "5"  # 12 steps × 2 batches, 5 batches an epoch: in the fifth
    assert (meta["ss_unet_lr"], meta["ss_text_encoder_lr"]) == ("0.0002", "5e-05")
    assert meta["ss_max_train_epochs"] == "5" and meta["ss_network_dropout"] == "0.05"
    assert json.loads(meta["ss_network_args"]) == {
        "conv_dim": "8", "conv_alpha": "1.0", "rank_dropout": "0.1",
    }  # fmt: skip
    plain = {**SAMPLE_PROVENANCE}  # no epochs recorded, no network options
    metadata["loramill.provenance"] = json.dumps(plain)
    meta = kohya_metadata(
        Checkpoint({}, metadata, {"unet": {"r": 8, "lora_alpha": 4}}), tensors, "x"
    )
    assert "ss_epoch" not in meta and "ss_network_args" not in meta


def test_export_date_is_the_day_written_and_never_reaches_tensors_or_hashes(
    random_checkpoint, tmp_path, monkeypatch
):
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    before = datetime.datetime.now(datetime.UTC).date().isoformat()
    export_adapter(random_checkpoint, tmp_path / "now.safetensors", None, "sample")
    after = datetime.datetime.now(datetime.UTC).date().isoformat()
    assert metadata_of(tmp_path / "now.safetensors")["modelspec.date"] in {before, after}

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "0")
    export_adapter(random_checkpoint, tmp_path / "epoch.safetensors", None, "sample")
    now, epoch = (metadata_of(tmp_path / f"{n}.safetensors") for n in ("now", "epoch"))
    assert epoch["modelspec.date"] == "1970-01-01"
    assert {k for k in now if now[k] != epoch[k]} == {"modelspec.date"}
    assert data_hash((tmp_path / "now.safetensors").read_bytes()) == now["sshs_model_hash"]

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(LoramillError, match="SOURCE_DATE_EPOCH='yesterday'"):
        export_adapter(random_checkpoint, tmp_path / "bad.safetensors", None, "sample")
    assert not (tmp_path / "bad.safetensors").exists()
