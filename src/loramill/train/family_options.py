"""Train options that mean something for one family of base model only, refused (naming the
key) where the base model is of another: checked when the workflow parses and again in the
train job, which knows the family of a hub model not downloaded at parse time.

Flux is trained by flow matching on a transformer, so the options of SD's DDPM objective
(timestep ranges, SNR weights, offset and pyramid noise), of CLIP conditioning (clip_skip,
chunked captions), of kohya's UNet networks (attention-only, LoCon) and of diffusers' SD
samplers have no effect on it; the Flux options have none on the UNet families. Free of torch.
"""

from __future__ import annotations

from typing import Any

from loramill import LoramillError
from loramill.models.unet_blocks import BLOCK_LR_OPTIONS, BLOCK_OPTIONS, check_block_lists
from loramill.train.config import text_encoder_lrs

FLUX_FAMILIES = ("flux", "chroma")
FLUX_ONLY = (
    "timestep_sampling",
    "sigmoid_scale",
    "discrete_flow_shift",
    "model_prediction_type",
    "guidance_scale",
    "t5xxl_max_token_length",
    "apply_t5_attn_mask",
    "train_blocks",
    "blocks_to_swap",
)
UNET_ONLY = (
    "clip_skip",
    "max_token_length",
    "min_timestep",
    "max_timestep",
    "min_snr_gamma",
    "scale_v_pred_loss_like_noise_pred",
    "noise_offset",
    "multires_noise_iterations",
    "sample_sampler",
    "network_type",  # LoHa, LoKr and DoRA are verified against the UNet clients' loaders only
    *BLOCK_OPTIONS,
    *BLOCK_LR_OPTIONS,
)


def _changed(train: Any, keys: tuple[str, ...]) -> list[str]:
    """The options among ``keys`` set away from the schema's default."""
    return [key for key in keys if getattr(train, key) != getattr(type(train), key)]


def check_family_options(train: Any, family: str | None) -> None:
    """Options that mean nothing for the base model's ``family`` (None: not known yet)."""
    if family is None:
        return
    flux = family in FLUX_FAMILIES
    if changed := _changed(train, UNET_ONLY if flux else FLUX_ONLY):
        owner = "the Stable Diffusion families" if flux else "FLUX.1 and Chroma"
        raise LoramillError(
            f"train.{changed[0]}: an option of {owner}, and the base model is {family}; remove it"
        )
    if flux:
        _check_flux(train, family)
    else:
        check_block_lists(train, family == "sdxl")
    if family == "sdxl" and train.clip_skip != 1:
        raise LoramillError(
            f"train.clip_skip {train.clip_skip}: SDXL is conditioned on each text encoder's "
            "penultimate layer (kohya's sdxl_train_network ignores clip_skip); remove it"
        )
    encoders = {"sdxl": 2, "chroma": 0}.get(family, 1)
    if isinstance(train.text_encoder_lr, tuple):
        text_encoder_lrs(train, ["unet", *[f"text_encoder_{i}" for i in range(encoders)]])


def _check_flux(train: Any, family: str) -> None:
    if train.network_target != "kohya":
        raise LoramillError(
            f"train.network_target '{train.network_target}': Flux trains kohya's Flux network "
            "(every Linear of the double and single blocks); use kohya, and train_blocks to "
            "choose blocks"
        )
    if not train.sdpa:
        raise LoramillError(
            "train.sdpa: false: Flux's transformer has scaled_dot_product_attention only; remove it"
        )
    if family == "chroma" and train.apply_t5_attn_mask is False:
        raise LoramillError(
            "train.apply_t5_attn_mask: false: Chroma reads T5 with its attention mask (kohya "
            "requires it for Chroma); remove it"
        )
    if family == "chroma" and train.train_text_encoder:
        raise LoramillError(
            "train.train_text_encoder: Chroma's only text encoder is T5, which is not trained "
            "(kohya's default); remove it"
        )


def check_guidance(train: Any, guidance_embeds: bool) -> None:
    """``guidance_scale`` on a Flux transformer without a guidance embedding ([schnell]):
    known once the transformer's config is read."""
    if not guidance_embeds and _changed(train, ("guidance_scale",)):
        raise LoramillError(
            f"train.guidance_scale {train.guidance_scale}: this base model has no guidance "
            "embedding (FLUX.1 [schnell], Chroma); remove it"
        )
