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


def _pipe(name: str, tmp_path_factory) -> tuple[Flux, object]:
    folder = build_tiny_flux(tmp_path_factory.mktemp(name), chroma=name == "chroma")
    code = Flux(name)
    return code, code.pipeline_class().from_pretrained(folder, local_files_only=True)


@pytest.fixture(scope="module", params=["flux", "chroma"])
def family_pipe(request, tmp_path_factory):
    return _pipe(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def flux_pipe(tmp_path_factory):
    """FLUX.1 alone: Chroma always reads T5 with its mask, in ChromaPipeline's way."""
    return _pipe("flux", tmp_path_factory)


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


def _image_prediction(code: Flux, pipe, how: FluxText, hidden_noise: float) -> torch.Tensor:
    """The transformer's prediction for the first caption, T5's states at the caption's
    padding positions moved by ``hidden_noise``."""
    latents = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    tokens = pipe.tokenizer_2(CAPTIONS[:1], padding="max_length", max_length=16)
    padding = torch.tensor(tokens.attention_mask)[..., None] == 0
    with torch.no_grad():
        conditioning = code.encode(*parts(code, pipe), CAPTIONS[:1], how)
        hidden = conditioning["hidden"]
        noise = torch.randn(hidden.shape, generator=torch.Generator().manual_seed(1))
        moved = {**conditioning, "hidden": hidden + hidden_noise * noise * padding}
        inputs = code.denoiser_inputs(moved, latents, torch.tensor([0.5]), 1.0)
        return pipe.transformer(**inputs).sample


def test_apply_t5_attn_mask_leaves_the_padding_out_of_every_attention(flux_pipe):
    """kohya's apply_t5_attn_mask on FLUX.1: the mask is read and kept with T5's states, and
    what T5 leaves at the padding positions cannot reach the image's prediction at all."""
    code, pipe = flux_pipe
    masked = FluxText(16, apply_t5_attn_mask=True)
    with torch.no_grad():
        read = code.encode(*parts(code, pipe), CAPTIONS[:1], masked)
    assert set(read) == {"hidden", "pooled", "mask"} and 0 < read["mask"].sum() < 16
    still = _image_prediction(code, pipe, masked, 0.0)
    assert torch.equal(_image_prediction(code, pipe, masked, 100.0), still)
    plain = _image_prediction(code, pipe, HOW, 0.0)
    assert not torch.allclose(plain, still, atol=1e-4)  # T5 and the attention read the padding
    assert not torch.allclose(_image_prediction(code, pipe, HOW, 100.0), plain, atol=1e-4)


def test_masked_prompts_render_the_same_picture_at_any_t5_length(flux_pipe):
    """With the mask, samples and grid cells read prompts as training read captions: the
    padding does not change the picture (only float rounding between shapes); without it
    the padding is read."""
    code, pipe = flux_pipe

    def picture(tokens: int, masked: bool):
        how = FluxText(tokens, apply_t5_attn_mask=masked)
        args = code.prompt_arguments(pipe, CAPTIONS[:1], [""], how, (64, 64))
        out = pipe(**args, height=64, width=64, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(3))  # fmt: skip
        return torch.from_numpy(out.images)

    short, long = picture(16, True), picture(40, True)
    assert torch.allclose(short, long, atol=1e-4)
    assert not torch.allclose(picture(16, False), picture(40, False), atol=1e-2)


def test_the_grid_is_given_every_option_a_family_reads_captions_with():
    """The grid rule passes PROMPT_OPTIONS: each field of each family's conditioning, so a
    grid reads its prompts as training read the captions."""
    from dataclasses import fields

    from loramill.models.clip_text import Conditioning
    from loramill.train.config import PROMPT_OPTIONS

    read = {field.name for kind in (Conditioning, FluxText) for field in fields(kind)}
    assert set(PROMPT_OPTIONS) == read
