"""A tiny SDXL-architecture pipeline with random weights, built offline from configs.

Stable Diffusion XL base's layout at small widths (``loramill.demo.full_size.SDXL`` is the full
size): a UNet conditioned on the two text encoders' hidden states side by side and, through its
``text_time`` addition embedding, on the second encoder's pooled output and six size and crop
numbers; ``text_encoder`` shaped like CLIP ViT-L, ``text_encoder_2`` like OpenCLIP bigG with its
projection; both tokenizers the real CLIP BPE (the second pads with "!", as SDXL's does); the
Euler scheduler SDXL ships with; a four-level VAE (8× down, as SDXL's). For tests of SDXL's
mechanics, where what is learned does not matter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from loramill.demo.tiny_models import CLIP_TEXT, RANDOM_TINY, SD_NOISE, build_clip_tokenizer

TEXT = {"intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
TIME_EMBED = 8  # per size or crop number; SDXL's is 256
TINY_SDXL = {
    "unet": {
        "sample_size": 8,
        "block_out_channels": (32, 64),
        "layers_per_block": 1,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "transformer_layers_per_block": (1, 2),
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "cross_attention_dim": 32 + 32,  # both encoders' hidden states, concatenated
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TIME_EMBED,
        "projection_class_embeddings_input_dim": 32 + 6 * TIME_EMBED,  # pooled + time ids
        "norm_num_groups": 16,
    },
    "vae": RANDOM_TINY["vae"],
    "text_encoder": {**TEXT, "hidden_size": 32, "projection_dim": 32},
    "text_encoder_2": {**TEXT, "hidden_size": 32, "projection_dim": 32, "hidden_act": "gelu"},
}


def sdxl_models(sizes: dict[str, dict]) -> dict[str, Any]:
    """The UNet and both text encoders at the given layer sizes (random weights; on the meta
    device under accelerate's ``init_empty_weights``)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = lambda name: CLIPTextConfig(**CLIP_TEXT, **sizes[name])  # noqa: E731
    return {
        "unet": UNet2DConditionModel(**sizes["unet"]),
        "text_encoder": CLIPTextModel(config("text_encoder")),
        "text_encoder_2": CLIPTextModelWithProjection(config("text_encoder_2")),
    }


def sdxl_pipeline(sizes: dict[str, dict] = TINY_SDXL, seed: int = 0) -> Any:
    """An SDXL pipeline with random weights and the given layer sizes; the same seed gives the
    same weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    torch.manual_seed(seed)
    models = sdxl_models(sizes)
    tokenizer_2 = build_clip_tokenizer()
    tokenizer_2.pad_token = "!"
    return StableDiffusionXLPipeline(
        **models,
        vae=AutoencoderKL(**sizes["vae"]),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=tokenizer_2,
        scheduler=EulerDiscreteScheduler(**SD_NOISE, timestep_spacing="leading"),
    )


def build_tiny_sdxl(
    out_dir: str | os.PathLike, sizes: dict[str, dict] = TINY_SDXL, seed: int = 0
) -> Path:
    """Build and save the pipeline (float32, a few MB); the same seed gives byte-identical files."""
    sdxl_pipeline(sizes, seed).save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
