"""Tiny Flux.1- and Chroma-architecture pipelines with random weights, built offline from configs.

FLUX.1's layout at small widths (``loramill.demo.full_size.FLUX_DEV`` is the full size): an MMDiT
transformer of double- and single-stream blocks on 64-wide packed tokens, conditioned on a T5
encoder's hidden states and CLIP-L's pooled output, [dev]'s guidance embedding (``guidance``:
False gives [schnell]'s layout); a four-level VAE with 16 latent channels and Flux's latent scale
and shift; the flow-matching Euler scheduler Flux ships with. Chroma: the same blocks without
their modulation layers, one approximator instead, T5 only. The T5 tokenizer is a small unigram
vocabulary (lowercase words and letters: every caption of the tests splits into known pieces);
the CLIP one is the real CLIP BPE. For tests of Flux's mechanics, where what is learned does
not matter.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from loramill.demo.full_size import FLUX_VAE
from loramill.demo.tiny_models import CLIP_TEXT, build_clip_tokenizer

HEADS, HEAD_DIM = 2, 8  # 16 wide; the rotary axes (2, 2, 4) split a head's 8 dims
TINY_FLUX = {
    "transformer": {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": HEADS,
        "joint_attention_dim": 32,
        "pooled_projection_dim": 32,
        "axes_dims_rope": (2, 2, 4),
    },
    # FLUX.1's autoencoder at small widths (its four levels: 8× down, 16 channels)
    "vae": {**FLUX_VAE, "block_out_channels": (16, 16, 32, 32), "layers_per_block": 1,
            "norm_num_groups": 8, "sample_size": 64},
    "text_encoder": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 4, "projection_dim": 32},
    "text_encoder_2": {"d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_heads": 4,
                       "feed_forward_proj": "gated-gelu", "is_encoder_decoder": False},
}  # fmt: skip
TINY_CHROMA_APPROXIMATOR = {
    "approximator_num_channels": 16,
    "approximator_hidden_dim": 32,
    "approximator_layers": 1,
}
# FLUX.1's scheduler: shifted by the image's token count (diffusers' calculate_shift)
FLUX_NOISE = {
    "num_train_timesteps": 1000,
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}
T5_WORDS = (
    *("a", "an", "the", "of", "on", "in", "with", "and", "background", "photo", "drawing"),
    *("red", "blue", "green", "white", "black", "yellow", "circle", "square", "triangle"),
    *("stripe", "stripes", "band", "bands", "paper", "wide"),
)


def build_t5_tokenizer() -> Any:
    """A T5 tokenizer (unigram, as T5's sentencepiece model) over ``T5_WORDS`` and letters."""
    from transformers import T5TokenizerFast

    pieces = [f"▁{word}" for word in T5_WORDS] + [f"▁{c}" for c in "abcdefghijklmnopqrstuvwxyz"]
    pieces += list("abcdefghijklmnopqrstuvwxyz0123456789,.-'!?")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -float(rank)) for rank, piece in enumerate(pieces, start=1)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=512)  # as FLUX.1's


def flux_pipeline(
    sizes: dict[str, dict] = TINY_FLUX, seed: int = 0, guidance: bool = True, chroma: bool = False
) -> Any:
    """A Flux (or Chroma) pipeline with random weights; the same seed gives the same weights."""
    from diffusers import (
        AutoencoderKL,
        ChromaPipeline,
        ChromaTransformer2DModel,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    t5 = T5EncoderModel(T5Config(vocab_size=len(build_t5_tokenizer()), **sizes["text_encoder_2"]))
    parts = {"vae": AutoencoderKL(**sizes["vae"])}
    parts["scheduler"] = FlowMatchEulerDiscreteScheduler(**FLUX_NOISE)
    if chroma:
        shared = {k: v for k, v in sizes["transformer"].items() if k != "pooled_projection_dim"}
        transformer = ChromaTransformer2DModel(**shared, **TINY_CHROMA_APPROXIMATOR)
        return ChromaPipeline(
            **parts, text_encoder=t5, tokenizer=build_t5_tokenizer(), transformer=transformer
        )
    clip = CLIPTextModel(CLIPTextConfig(**CLIP_TEXT, **sizes["text_encoder"]))
    transformer = FluxTransformer2DModel(**sizes["transformer"], guidance_embeds=guidance)
    return FluxPipeline(
        **parts,
        text_encoder=clip,
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=t5,
        tokenizer_2=build_t5_tokenizer(),
        transformer=transformer,
    )


def build_tiny_flux(
    out_dir: str | os.PathLike, seed: int = 0, guidance: bool = True, chroma: bool = False
) -> Path:
    """Build and save the pipeline (float32, a few MB); the same seed gives identical files."""
    pipe = flux_pipeline(seed=seed, guidance=guidance, chroma=chroma)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)
