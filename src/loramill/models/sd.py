"""The Stable Diffusion 1.x/2.x family: a UNet on 4 latent channels conditioned on one CLIP
text encoder's hidden states (CLIP ViT-L for 1.x, OpenCLIP ViT-H for 2.x).

Each family module answers the same questions (loramill.models.families tells which one a
base model is): the pipeline class and the components it trains, how captions become the
UNet's inputs, the labels kohya and ModelSpec give its LoRAs, the default resolution.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from loramill.models.clip_text import Conditioning, chunked, tokenize
from loramill.models.samplers import make_sampler


def _encode(text_encoder: Any, tokens: torch.Tensor, clip_skip: int) -> torch.Tensor:
    if clip_skip <= 1:
        return text_encoder(tokens)[0]
    hidden = text_encoder(tokens, output_hidden_states=True).hidden_states[-clip_skip]
    # transformers 5's CLIPTextModel holds the norm itself; 4's inside .text_model
    return getattr(text_encoder, "text_model", text_encoder).final_layer_norm(hidden)


def encode_prompts(
    tokenizer: Any, text_encoder: Any, captions: Sequence[str], how: Conditioning | None = None
) -> torch.Tensor:
    """The UNet's conditioning for ``captions`` (one row each)."""
    how = how or Conditioning()
    tokens = tokenize(tokenizer, captions, how, text_encoder.device)
    return chunked(tokens, how, lambda chunk: _encode(text_encoder, chunk, how.clip_skip))


class StableDiffusion:
    """SD 1.x (``sd1``) and 2.x (``sd2``): they differ in their labels only."""

    denoiser = "unet"
    text_encoders = ("text_encoder",)
    trainable_encoders = text_encoders  # train_text_encoder trains them all
    half_encoders = ()  # frozen encoders held in half precision: none, they fill the caches
    sample_guidance = 7.5  # samples' guidance scale unless a prompt's --l says
    tokenizers = ("tokenizer",)
    # kohya's key prefixes (networks/lora.py): the UNet, then the text encoder
    kohya_prefixes: ClassVar[dict[str, str]] = {"unet": "lora_unet", "text_encoder": "lora_te"}

    def __init__(self, name: str) -> None:
        self.name = name

    def conditioning(self, cfg: Any) -> Conditioning:
        """How captions are read, from the train options (kohya's clip_skip and
        max_token_length)."""
        return Conditioning(cfg.clip_skip, cfg.max_token_length)

    def sampler(self, name: str, scheduler: Any) -> Any:
        """The scheduler samples render with: kohya's ``sample_sampler`` ``name``."""
        return make_sampler(name, scheduler.config)

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline

    def pipeline_options(self) -> dict[str, Any]:
        """Options to build or load the pipeline with (no safety checker: outputs are
        evaluation grids and samples)."""
        return {"safety_checker": None, "requires_safety_checker": False}

    def assemble(self, components: dict[str, Any]) -> Any:
        """A pipeline from loaded components (samples during training)."""
        extra = {"feature_extractor": None, **self.pipeline_options()}
        return self.pipeline_class()(**components, **extra)

    def version(self, pipe: Any) -> str:
        """``sd_v1``, or ``sd_v2`` with ``-v`` for v-prediction: what the export labels
        the adapter."""
        if self.name != "sd2":
            return "sd_v1"
        v_prediction = pipe.scheduler.config.get("prediction_type") == "v_prediction"
        return "sd_v2-v" if v_prediction else "sd_v2"

    def encode(
        self, tokenizers: list[Any], encoders: list[Any], captions: Sequence[str], how: Conditioning
    ) -> dict[str, torch.Tensor]:
        """The caption's conditioning, as the text-embedding cache stores it."""
        return {"hidden": encode_prompts(tokenizers[0], encoders[0], captions, how)}

    def unet_inputs(
        self, conditioning: dict[str, torch.Tensor], sizes: torch.Tensor | None
    ) -> dict[str, Any]:
        """The UNet's keyword inputs besides the noisy latents and timesteps."""
        return {"encoder_hidden_states": conditioning["hidden"]}

    def size_conditions(self, entries: list[dict[str, Any]]) -> torch.Tensor | None:
        """What the UNet is told of each image's size and crop: nothing."""
        return None

    def prompt_arguments(
        self,
        pipe: Any,
        prompts: list[str],
        negatives: list[str],
        how: Conditioning,
        size: tuple[int, int],
    ) -> dict[str, Any]:
        """The pipeline's prompt arguments (the same at any image ``size``). With clip_skip or
        longer captions the embeddings are made here, the way training made them (diffusers'
        own clip_skip expects transformers 4's CLIP layout)."""
        if how.clip_skip <= 1 and how.max_token_length <= 75:
            return {"prompt": prompts, "negative_prompt": negatives}
        parts = ([pipe.tokenizer], [pipe.text_encoder])
        with torch.no_grad():
            embeds = [self.encode(*parts, texts, how)["hidden"] for texts in (prompts, negatives)]
        return {"prompt_embeds": embeds[0], "negative_prompt_embeds": embeds[1]}
