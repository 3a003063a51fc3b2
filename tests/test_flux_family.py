"""The Flux family's code (loramill.models.flux.family, issue #30) reads captions and feeds the
transformer exactly as diffusers' FluxPipeline and ChromaPipeline do: same text states, and a
transformer call built from our inputs gives the pipeline's own first prediction."""

from __future__ import annotations

import pytest
import torch

from loramill.demo.tiny_flux import build_tiny_flux
from loramill.models.flux.family import Flux, FluxText
from loramill.models.flux.latents import pack

CAPTIONS = ["wband, a red circle on a white background", "a blue square"]
HOW = FluxText(t5xxl_max_token_length=16)


@pytest.fixture(scope="module", params=["flux", "chroma"])
def family_pipe(request, tmp_path_factory):
    folder = build_tiny_flux(
        tmp_path_factory.mktemp(request.param), chroma=request.param == "chroma"
    )
    code = Flux(request.param)
    return code, code.pipeline_class().from_pretrained(folder, local_files_only=True)


def parts(code: Flux, pipe) -> tuple[list, list]:
    return [getattr(pipe, n) for n in code.tokenizers], [
        getattr(pipe, n) for n in code.text_encoders
    ]


def test_captions_read_as_the_pipeline_reads_them(family_pipe):
    code, pipe = family_pipe
    with torch.no_grad():
        ours = code.encode(*parts(code, pipe), CAPTIONS, HOW)
        if code.name == "chroma":
            states, _, mask, *_ = pipe.encode_prompt(
                CAPTIONS, do_classifier_free_guidance=False, max_sequence_length=16
            )
            assert torch.equal(ours["hidden"], states) and set(ours) == {"hidden", "mask"}
            assert ours["mask"].sum() < mask.sum()  # the pipeline's keeps one padding token more
        else:
            states, pooled, _ = pipe.encode_prompt(CAPTIONS, max_sequence_length=16)
            assert torch.equal(ours["hidden"], states) and torch.equal(ours["pooled"], pooled)


def test_the_transformer_gets_the_pipelines_inputs(family_pipe):
    code, pipe = family_pipe
    seen = {}

    def record(module, args, kwargs, output):
        seen.setdefault("kwargs", kwargs)
        seen.setdefault("output", output[0])

    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    hook = pipe.transformer.register_forward_hook(record, with_kwargs=True)
    extra = {} if code.name == "chroma" else {"guidance_scale": 2.5}
    pipe(CAPTIONS[0], height=64, width=64, num_inference_steps=1, latents=pack(latents),
         max_sequence_length=16, guidance_scale=extra.get("guidance_scale", 1.0))  # fmt: skip
    hook.remove()
    with torch.no_grad():
        conditioning = code.encode(*parts(code, pipe), CAPTIONS[:1], HOW)
        sigma = seen["kwargs"]["timestep"]
        inputs = code.denoiser_inputs(conditioning, latents, sigma, 2.5)
        ours = pipe.transformer(**inputs).sample
    assert torch.allclose(ours, seen["output"], atol=1e-6)
    if code.name == "flux":  # the guidance scale reaches the prediction
        inputs = code.denoiser_inputs(conditioning, latents, sigma, 4.0)
        with torch.no_grad():
            assert not torch.allclose(pipe.transformer(**inputs).sample, ours)


def test_labels():
    assert Flux("flux").kohya_prefixes == {
        "transformer": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te3"
    }  # fmt: skip
    assert Flux("chroma").kohya_prefixes == {"transformer": "lora_unet", "text_encoder": "lora_te3"}
