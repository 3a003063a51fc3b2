"""The SDXL family (Stable Diffusion XL base): a UNet conditioned on two CLIP text encoders and
on each image's size and crop.

As kohya's ``sdxl_train_network.py`` and diffusers' SDXL pipeline do it:

- the hidden states of both encoders' penultimate layers (CLIP ViT-L, OpenCLIP ViT-bigG), side
  by side (768 + 1280 = 2048 wide), without the final layer norm;
- the second encoder's pooled, projected output (``text_embeds``), of the first chunk of 75
  tokens for longer captions;
- six size numbers per image (``add_time_ids``): its original height and width, the top-left
  corner of the crop that made it, and the size it was trained at, as the resize stage
  recorded them (loramill.prepare.resize's manifest).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from loramill.models.clip_text import Conditioning, chunked, tokenize
from loramill.models.samplers import make_sampler


def size_condition(entry: dict[str, Any]) -> list[int]:
    """One image's ``add_time_ids`` from its manifest entry (sizes there are width, height)."""
    width, height = entry["original_size"]
    top, left = entry["crop_top_left"]
    bucket_width, bucket_height = entry["bucket"]
    return [height, width, top, left, bucket_height, bucket_width]


class StableDiffusionXL:
    name = "sdxl"
    denoiser = "unet"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_encoders = text_encoders  # train_text_encoder trains them all
    half_encoders = ()  # frozen encoders held in half precision: none, they fill the caches
    sample_guidance = 7.5  # samples' guidance scale unless a prompt's --l says
    tokenizers = ("tokenizer", "tokenizer_2")
    # kohya's SDXL key prefixes (networks/lora.py: LORA_PREFIX_TEXT_ENCODER1 / 2)
    kohya_prefixes: ClassVar[dict[str, str]] = {
        "unet": "lora_unet",
        "text_encoder": "lora_te1",
        "text_encoder_2": "lora_te2",
    }

    def conditioning(self, cfg: Any) -> Conditioning:
        """How captions are read, from the train options (kohya's clip_skip and
        max_token_length)."""
        return Conditioning(cfg.clip_skip, cfg.max_token_length)

    def sampler(self, name: str, scheduler: Any) -> Any:
        """The scheduler samples render with: kohya's ``sample_sampler`` ``name``."""
        return make_sampler(name, scheduler.config)

    def pipeline_class(self) -> Any:
        from diffusers import StableDiffusionXLPipeline

        return StableDiffusionXLPipeline

    def pipeline_options(self) -> dict[str, Any]:
        """No invisible watermark: images stay the model's own, whatever is installed."""
        return {"add_watermarker": False}

    def assemble(self, components: dict[str, Any]) -> Any:
        return self.pipeline_class()(**components, **self.pipeline_options())

    def version(self, pipe: Any) -> str:
        return "sdxl"

    def encode(
        self, tokenizers: list[Any], encoders: list[Any], captions: Sequence[str], how: Conditioning
    ) -> dict[str, torch.Tensor]:
        """Both encoders' penultimate hidden states, joined, and the second's pooled output."""
        hidden, pooled = [], []
        for tokenizer, encoder in zip(tokenizers, encoders, strict=True):

            def penultimate(chunk: torch.Tensor, encoder: Any = encoder) -> torch.Tensor:
                out = encoder(chunk, output_hidden_states=True)
                if hasattr(out, "text_embeds"):  # the encoder with a projection: bigG
                    pooled.append(out.text_embeds)
                return out.hidden_states[-2]

            tokens = tokenize(tokenizer, captions, how, encoder.device)
            hidden.append(chunked(tokens, how, penultimate))
        return {"hidden": torch.cat(hidden, dim=-1), "pooled": pooled[0]}

    def unet_inputs(
        self, conditioning: dict[str, torch.Tensor], sizes: torch.Tensor | None
    ) -> dict[str, Any]:
        added = {"text_embeds": conditioning["pooled"], "time_ids": sizes}
        return {"encoder_hidden_states": conditioning["hidden"], "added_cond_kwargs": added}

    def size_conditions(self, entries: list[dict[str, Any]]) -> torch.Tensor:
        return torch.tensor([size_condition(entry) for entry in entries], dtype=torch.float32)

    def prompt_arguments(
        self,
        pipe: Any,
        prompts: list[str],
        negatives: list[str],
        how: Conditioning,
        size: tuple[int, int],
    ) -> dict[str, Any]:
        """The pipeline's prompt arguments (the same at any image ``size``). No negative prompt
        is the pipeline's zeros (SDXL base's ``force_zeros_for_empty_prompt``); longer captions
        are encoded here, as training encoded them."""
        negative = list(negatives) if any(negatives) else None
        if how.max_token_length <= 75:
            return {"prompt": list(prompts), "negative_prompt": negative}
        parts = ([pipe.tokenizer, pipe.tokenizer_2], [pipe.text_encoder, pipe.text_encoder_2])
        with torch.no_grad():
            positive = self.encode(*parts, prompts, how)
            args = {"prompt_embeds": positive["hidden"], "pooled_prompt_embeds": positive["pooled"]}
            if negative is not None:
                against = self.encode(*parts, negative, how)
                args["negative_prompt_embeds"] = against["hidden"]
                args["negative_pooled_prompt_embeds"] = against["pooled"]
        return args
