"""The tiny Flux.1 and Chroma pipelines (loramill.demo.tiny_flux, issue #30): built offline,
loaded and run by diffusers' own pipelines, the same bytes from the same seed."""

from __future__ import annotations

import pytest
import torch
from conftest import digest

from loramill import LoramillError
from loramill.demo.tiny_flux import build_t5_tokenizer, build_tiny_flux
from loramill.models.families import image_family
from loramill.models.flux.latents import image_ids, pack

PROMPT = "wband, a red circle on a white background"


def files(root) -> list:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def test_dev_draws_with_both_encoders_and_its_guidance(tiny_flux):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(tiny_flux, local_files_only=True)
    assert pipe.transformer.config.guidance_embeds and pipe.vae.config.latent_channels == 16
    # the tokenizer read back from disk splits a caption as the built one does, into known pieces
    ids = pipe.tokenizer_2(PROMPT).input_ids
    assert (
        ids == build_t5_tokenizer()(PROMPT).input_ids and pipe.tokenizer_2.unk_token_id not in ids
    )
    states, pooled, text_ids = pipe.encode_prompt(PROMPT, prompt_2=None, max_sequence_length=16)
    assert (states.shape, pooled.shape, text_ids.shape) == ((1, 16, 32), (1, 32), (16, 3))
    latents = pack(torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(0)))

    def predict(guidance: float) -> torch.Tensor:
        with torch.no_grad():
            return pipe.transformer(
                latents, timestep=torch.tensor([0.5]), guidance=torch.tensor([guidance]),
                pooled_projections=pooled, encoder_hidden_states=states,
                txt_ids=text_ids, img_ids=image_ids(8, 8),
            ).sample  # fmt: skip

    assert predict(1.0).shape == latents.shape
    assert not torch.equal(predict(1.0), predict(3.5))
    generator = torch.Generator().manual_seed(0)
    image = pipe(PROMPT, height=64, width=64, num_inference_steps=2, max_sequence_length=16,
                 generator=generator).images[0]  # fmt: skip
    assert image.size == (64, 64)


def test_schnell_and_chroma_layouts(tmp_path):
    from diffusers import ChromaPipeline, FluxPipeline

    schnell = FluxPipeline.from_pretrained(build_tiny_flux(tmp_path / "s", guidance=False))
    assert not schnell.transformer.config.guidance_embeds
    chroma = ChromaPipeline.from_pretrained(build_tiny_flux(tmp_path / "c", chroma=True))
    names = {name for name, _ in chroma.transformer.named_modules()}
    assert "distilled_guidance_layer" in names and "transformer_blocks.0.norm1.linear" not in names
    generator = torch.Generator().manual_seed(0)
    image = chroma(PROMPT, height=64, width=64, num_inference_steps=2, generator=generator)
    assert image.images[0].size == (64, 64)


def test_the_same_seed_builds_the_same_bytes(tiny_flux, tmp_path):
    again = build_tiny_flux(tmp_path / "again")
    assert files(again) == files(tiny_flux)
    assert all(digest(again / name) == digest(tiny_flux / name) for name in files(tiny_flux))
    other = build_tiny_flux(tmp_path / "other", seed=1)
    weights = "transformer/diffusion_pytorch_model.safetensors"
    assert digest(other / weights) != digest(tiny_flux / weights)


def test_it_is_a_base_model_of_the_flux_family(tiny_flux, tmp_path):
    assert image_family(str(tiny_flux)) == "flux"
    assert image_family(str(build_tiny_flux(tmp_path / "c", chroma=True))) == "chroma"
    with pytest.raises(LoramillError, match=r"base_model_family 'sdxl' \(SDXL\) but base_model"):
        image_family(str(tiny_flux), "sdxl")


def test_a_bf16_flux_jobs_memory_request_counts_the_transformer_and_t5_in_half(tiny_flux):
    """Snakemake's mem_mb for a Flux train job (rules/common.smk model_mem_mb): under mixed
    precision the transformer and T5 load in bf16, so their weights count 2 bytes each (at
    full size, from the parameter counts: about 80 GiB asked before, 42 GiB now, at 512 px);
    the VAE and CLIP-L, float32, and every UNet family stay at 4."""
    from loramill.models.base_model import float32_bytes, job_mem_mb
    from loramill.models.families import half_in_training

    sizes = float32_bytes(str(tiny_flux))
    assert sizes["transformer"] > 0 and sizes["text_encoder_2"] > 0
    half = half_in_training("flux", "bf16")
    assert half == ("transformer", "text_encoder_2")
    assert half_in_training("chroma", "bf16") == ("transformer", "text_encoder")
    assert half_in_training("flux", "no") == half_in_training("sdxl", "bf16") == ()
    whole, halved = (job_mem_mb(str(tiny_flux), 512, 1, True, h) for h in ((), half))
    saved = (sizes["transformer"] + sizes["text_encoder_2"]) / 2 / 2**20 * 1.25
    assert whole - halved == pytest.approx(saved, abs=1)
