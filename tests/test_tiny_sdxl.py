"""The tiny SDXL-architecture pipeline (loramill.demo.tiny_sdxl): built offline, loaded by
diffusers' SDXL pipeline with every SDXL condition in use, the same bytes from the same seed,
and refused as a base model while loramill trains SD 1.x/2.x only."""

from __future__ import annotations

import pytest
import torch
from conftest import digest

from loramill import LoramillError
from loramill.demo.tiny_sdxl import build_tiny_sdxl
from loramill.models.families import image_family


def test_it_draws_with_both_text_encoders_and_the_size_conditions(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    states, _, pooled, _ = pipe.encode_prompt("a red square", do_classifier_free_guidance=False)
    assert (states.shape, pooled.shape) == ((1, 77, 64), (1, 32))
    ids = pipe.tokenizer("a red square", padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        first = pipe.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
    assert torch.equal(states[..., :32], first)  # the first encoder's penultimate layer, then
    assert not torch.equal(states[..., 32:], first)  # the second's beside it

    def predict(time_ids: list[float]) -> torch.Tensor:
        conditions = {"text_embeds": pooled, "time_ids": torch.tensor([time_ids])}
        latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            return pipe.unet(latents, 500, states, added_cond_kwargs=conditions).sample

    # original size, crop top-left, target size: each reaches the prediction
    assert not torch.equal(predict([64, 64, 0, 0, 64, 64]), predict([128, 128, 0, 0, 64, 64]))
    assert not torch.equal(predict([64, 64, 0, 0, 64, 64]), predict([64, 64, 8, 0, 64, 64]))
    generator = torch.Generator().manual_seed(0)
    image = pipe("a red square", num_inference_steps=2, height=64, width=64, generator=generator)
    assert image.images[0].size == (64, 64)


def test_the_same_seed_builds_the_same_bytes(tiny_sdxl, tmp_path):
    again = build_tiny_sdxl(tmp_path / "again")
    files = lambda root: sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())  # noqa: E731
    assert files(again) == files(tiny_sdxl)
    assert all(digest(again / name) == digest(tiny_sdxl / name) for name in files(tiny_sdxl))


def test_its_family_is_read_from_its_configs(tiny_sdxl):
    assert image_family(str(tiny_sdxl)) == "sdxl"
    assert image_family(str(tiny_sdxl), "sdxl") == "sdxl"
    with pytest.raises(LoramillError, match=r"^base_model_family 'sd2' .* is SDXL"):
        image_family(str(tiny_sdxl), "sd2")
