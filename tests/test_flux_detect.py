"""Flux base models told apart from their configs (loramill.models.flux.detect, issue
#30): FLUX.1 [dev] / [schnell] and Chroma folders as the tiny builders and diffusers write them;
Flux's task models and other transformers refused in one line naming what they are."""

from __future__ import annotations

import json

import pytest

from loramill import LoramillError
from loramill.demo.tiny_flux import build_tiny_flux
from loramill.models.flux.detect import flux_variant, transformer_family


def configs(folder) -> tuple[str, dict]:
    pipeline = json.loads((folder / "model_index.json").read_text())["_class_name"]
    return pipeline, json.loads((folder / "transformer" / "config.json").read_text())


@pytest.fixture(scope="module")
def dev(tmp_path_factory) -> tuple[str, dict]:
    return configs(build_tiny_flux(tmp_path_factory.mktemp("dev")))


@pytest.mark.parametrize(
    ("options", "family", "variant"),
    [
        ({}, "flux", "dev"),
        ({"guidance": False}, "flux", "schnell"),
        ({"chroma": True}, "chroma", "chroma"),
    ],
    ids=["dev", "schnell", "chroma"],
)
def test_written_folders_are_told_apart(tmp_path, options, family, variant):
    pipeline, transformer = configs(build_tiny_flux(tmp_path / "m", **options))
    assert transformer_family(pipeline, transformer) == family
    assert flux_variant(transformer) == variant


@pytest.mark.parametrize(
    ("pipeline", "changes", "message"),
    [
        ("FluxFillPipeline", {}, r"^FLUX\.1 Fill \(inpainting\) \(FluxFillPipeline\): a task"),
        ("FluxKontextPipeline", {}, r"^FLUX\.1 Kontext \(image editing\) \(FluxKontextPipeline\)"),
        ("FluxPipeline", {"in_channels": 384}, r"^a Fill \(inpainting\) model \(FluxPipeline: its "
         r"transformer takes 384 input features, not 64\)$"),
        ("FluxPipeline", {"in_channels": 128}, r"^a Control model \(FluxPipeline: its transformer"),
        ("StableDiffusion3Pipeline", {"_class_name": "SD3Transformer2DModel"},
         r"^a StableDiffusion3Pipeline whose denoiser is a SD3Transformer2DModel, not a Flux"),
        ("ChromaPipeline", {}, r"^a ChromaPipeline holding a FluxTransformer2DModel$"),
    ],
    ids=["fill", "kontext", "fill-weights", "control", "sd3", "mismatch"],
)  # fmt: skip
def test_other_kinds_are_refused_by_name(dev, pipeline, changes, message):
    _, transformer = dev
    with pytest.raises(LoramillError, match=message):
        transformer_family(pipeline, {**transformer, **changes})
