"""The Flux family: FLUX.1 [dev] and [schnell] (``flux``) and Chroma (``chroma``), MMDiT
transformers on packed 16-channel latents, trained by flow matching.

As kohya's ``flux_train_network.py`` and diffusers' Flux pipelines do it:

- FLUX.1: T5's last hidden states (``t5xxl_max_token_length`` tokens, padded; 512 for [dev],
  256 for [schnell], kohya's defaults) and CLIP-L's pooled output (77 tokens). T5 attends to
  its padding as FluxPipeline's does, unless ``apply_t5_attn_mask``: then, as kohya's
  strategy_flux and flux_models do it, T5 reads the caption with its attention mask and every
  attention of the transformer leaves the padding tokens out as keys (``text_mask_inputs``);
  [dev] also gets the guidance scale it was distilled with (``guidance_scale``), [schnell] has
  no guidance embedding;
- Chroma: T5 alone, reading the caption with its attention mask; the transformer gets
  ChromaPipeline's mask of the caption and one padding token (kohya keeps one padding token
  too) as diffusers' pipeline passes it, so training sees what its grid renders with;
- the latents, scaled and shifted by the VAE's config, packed 2 × 2 into tokens
  (loramill.models.flux.latents), the text tokens at position zero.

Which modules are trained, and their names in kohya's layout: loramill.models.flux.layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from loramill.models.flux.detect import HALF_ENCODERS
from loramill.models.flux.latents import image_ids, pack

CLIP_TOKENS = 77


@dataclass(frozen=True)
class FluxText:
    """How captions become Flux's conditioning (kohya's option names)."""

    t5xxl_max_token_length: int = 512
    # kohya's option: T5 and the transformer leave the caption's padding out (always so for
    # Chroma, in ChromaPipeline's way)
    apply_t5_attn_mask: bool = False


class Flux:
    denoiser = "transformer"

    def __init__(self, name: str = "flux", guidance_embeds: bool = True) -> None:
        self.name = name  # "flux" (FLUX.1 [dev] or [schnell]) or "chroma"
        # [dev]'s guidance embedding; [schnell] has none (its family code from a loaded
        # pipeline knows which, loramill.models.base_model.pipeline_family)
        self.guidance_embeds = guidance_embeds and name != "chroma"
        chroma = name == "chroma"
        self.text_encoders = ("text_encoder",) if chroma else ("text_encoder", "text_encoder_2")
        self.tokenizers = ("tokenizer",) if chroma else ("tokenizer", "tokenizer_2")
        # train_text_encoder trains CLIP-L, never T5 (kohya's default; Chroma has no CLIP-L)
        self.trainable_encoders = () if chroma else ("text_encoder",)
        # T5-XXL (19 GB in float32, the last encoder) loads in half precision under mixed
        # precision
        self.half_encoders = HALF_ENCODERS[name]
        # samples' guidance scale unless a prompt's --l says: the pipelines' defaults
        self.sample_guidance = 5.0 if chroma else 3.5
        # kohya's prefixes (networks/lora_flux.py): CLIP-L is te1, T5 te3 (Chroma's only encoder)
        prefixes = ("lora_te3",) if chroma else ("lora_te1", "lora_te3")
        encoders = dict(zip(self.text_encoders, prefixes, strict=True))
        self.kohya_prefixes: dict[str, str] = {"transformer": "lora_unet", **encoders}

    def conditioning(self, cfg: Any) -> FluxText:
        """How captions are read: T5's token count is ``t5xxl_max_token_length``, or kohya's
        default (256 for [schnell], 512 for [dev] and Chroma); ``apply_t5_attn_mask`` unset is
        kohya's default (off for FLUX.1; Chroma is always read with its mask)."""
        chroma = self.name == "chroma"
        tokens = cfg.t5xxl_max_token_length
        if tokens is None:
            tokens = 512 if self.guidance_embeds or chroma else 256
        masked = cfg.apply_t5_attn_mask
        return FluxText(tokens, chroma if masked is None else masked)

    def size_conditions(self, entries: list[dict[str, Any]]) -> None:
        """Flux is told nothing of an image's size but its latent positions (image ids)."""
        return None

    def sampler(self, name: str, scheduler: Any) -> Any:
        """The scheduler samples render with: the base model's own flow-matching Euler
        (kohya's SD sampler names do not apply; the workflow refuses them)."""
        return type(scheduler).from_config(scheduler.config)

    def pipeline_class(self) -> Any:
        from diffusers import ChromaPipeline, FluxPipeline

        return ChromaPipeline if self.name == "chroma" else FluxPipeline

    def pipeline_options(self) -> dict[str, Any]:
        return {}

    def assemble(self, components: dict[str, Any]) -> Any:
        return self.pipeline_class()(**components, **self.pipeline_options())

    def version(self, pipe: Any) -> str:
        """kohya's ``ss_base_model_version``: ``flux1`` for [dev] and [schnell], ``chroma``."""
        return "chroma" if self.name == "chroma" else "flux1"

    def architecture(self, pipe: Any) -> str:
        """ModelSpec's ``architecture`` of a LoRA on this base (kohya's sai_model_spec)."""
        if self.name == "chroma":
            return "chroma/lora"
        dev = pipe.transformer.config.guidance_embeds
        return f"flux-1-{'dev' if dev else 'schnell'}/lora"

    def encode(
        self, tokenizers: list[Any], encoders: list[Any], captions: Sequence[str], how: FluxText
    ) -> dict[str, torch.Tensor]:
        """T5's hidden states (``hidden``); its attention mask (``mask``) for Chroma and with
        ``apply_t5_attn_mask``; for FLUX.1 CLIP-L's pooled output (``pooled``)."""
        t5, t5_tokenizer = encoders[-1], tokenizers[-1]
        tokens = t5_tokenizer(
            list(captions),
            padding="max_length",
            max_length=how.t5xxl_max_token_length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(t5.device), tokens.attention_mask.to(t5.device)
        if how.apply_t5_attn_mask or self.name == "chroma":  # T5 reads the caption alone
            out = {"hidden": t5(ids, attention_mask=mask)[0], "mask": mask}
        else:
            out = {"hidden": t5(ids)[0]}
        if self.name == "chroma":
            return out
        clip_ids = tokenizers[0](
            list(captions),
            padding="max_length",
            max_length=CLIP_TOKENS,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(encoders[0].device)
        out["pooled"] = encoders[0](clip_ids).pooler_output
        return out

    def denoiser_inputs(
        self,
        conditioning: dict[str, torch.Tensor],
        latents: torch.Tensor,
        sigma: torch.Tensor,
        guidance_scale: float,
    ) -> dict[str, Any]:
        """The transformer's keyword inputs for noisy ``latents`` (batch, 16, h, w) at noise
        levels ``sigma`` (its timestep; it scales by 1000 itself)."""
        hidden = conditioning["hidden"]
        height, width = latents.shape[-2:]
        inputs = {
            "hidden_states": pack(latents),
            "timestep": sigma.to(latents.dtype),
            "encoder_hidden_states": hidden,
            "txt_ids": torch.zeros(hidden.shape[1], 3, device=latents.device),
            "img_ids": image_ids(height, width).to(latents.device),
        }
        if self.name == "chroma":
            # As ChromaPipeline passes it: 1 for the tokens kept, 0 for the others, in the
            # latents' dtype (the transformer's attention adds it to the scores)
            text = _kept_text(conditioning["mask"]).to(latents.dtype)
            image = torch.ones(text.shape[0], inputs["hidden_states"].shape[1], dtype=text.dtype)
            inputs["attention_mask"] = torch.cat([text, image.to(text.device)], dim=1)
            return inputs
        inputs["pooled_projections"] = conditioning["pooled"]
        if "mask" in conditioning:  # apply_t5_attn_mask
            image_tokens = inputs["hidden_states"].shape[1]
            inputs["joint_attention_kwargs"] = text_mask_inputs(conditioning["mask"], image_tokens)
        if self.guidance_embeds:
            guidance = torch.full((latents.shape[0],), float(guidance_scale))
            inputs["guidance"] = guidance.to(latents.device)
        return inputs

    def prompt_arguments(
        self,
        pipe: Any,
        prompts: list[str],
        negatives: list[str],
        how: FluxText,
        size: tuple[int, int],
    ) -> dict[str, Any]:
        """The pipeline's prompt arguments for images of ``size`` (height, width): T5 read as
        training read it. Chroma's guidance is classifier-free, against the negative prompt;
        FLUX.1's guidance embedding reads none."""
        if self.name == "chroma" or not how.apply_t5_attn_mask:
            args = {"prompt": list(prompts), "max_sequence_length": how.t5xxl_max_token_length}
            return args | ({"negative_prompt": list(negatives)} if self.name == "chroma" else {})
        # FluxPipeline reads T5 without its mask: the conditioning is made here, as training
        # made it, and the mask goes to every attention of every step
        encoders = [getattr(pipe, name) for name in self.text_encoders]
        tokenizers = [getattr(pipe, name) for name in self.tokenizers]
        with torch.no_grad():
            conditioning = self.encode(tokenizers, encoders, prompts, how)
        per_side = 2 * pipe.vae_scale_factor  # latent pixels per packed token, on each side
        image_tokens = (size[0] // per_side) * (size[1] // per_side)
        return {
            "prompt_embeds": conditioning["hidden"],
            "pooled_prompt_embeds": conditioning["pooled"],
            "joint_attention_kwargs": text_mask_inputs(conditioning["mask"], image_tokens),
        }


def text_mask_inputs(mask: torch.Tensor, image_tokens: int) -> dict[str, torch.Tensor]:
    """The transformer's ``joint_attention_kwargs`` that leave T5's padding out, as kohya's
    flux_models does with ``apply_t5_attn_mask``: every query (text and image tokens) sees the
    caption's tokens and every image token as keys, none of the padding; a boolean mask of
    (batch, 1, 1, text + image tokens) that each attention's scaled_dot_product_attention
    broadcasts over heads and queries."""
    image = torch.ones(mask.shape[0], image_tokens, dtype=torch.bool, device=mask.device)
    keys = torch.cat([mask.to(torch.bool), image], dim=1)
    return {"attention_mask": keys[:, None, None, :]}


def _kept_text(mask: torch.Tensor) -> torch.Tensor:
    """Chroma's text tokens the transformer attends to: the caption's and one padding token."""
    lengths = mask.sum(dim=1, keepdim=True)
    positions = torch.arange(mask.shape[1], device=mask.device).unsqueeze(0)
    return positions <= lengths
