"""A pipeline's weights as one single-file checkpoint in the original (LDM) layout — what
AUTOMATIC1111 and ComfyUI load, and what ``python -m loramill.models.single_file`` converts
back — written from the name tables (loramill.export.ldm_names, .sdxl_layout) that export
verification trusts, so a round trip through diffusers' own converter checks them.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from loramill.export.ldm_names import unet_pairs
from loramill.models.kohya_names import TE_ROOT

# The VAE's LDM names, by rewriting diffusers' (ordered: the up blocks' numbering runs
# backwards, so they are renamed through a placeholder first).
VAE_RULES = (
    (r"^(encoder|decoder)\.down_blocks\.(\d+)\.resnets\.", r"\1.down.\2.block."),
    (r"^(encoder|decoder)\.down_blocks\.(\d+)\.downsamplers\.0\.", r"\1.down.\2.downsample."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_(q|k|v)\.", r"\1.mid.attn_1.\2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.to_out\.0\.", r"\1.mid.attn_1.proj_out."),
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
)


def vae_ldm_name(key: str, up_blocks: int) -> str:
    """The LDM name of a diffusers VAE weight (``up_blocks`` = the decoder's block count)."""
    match = re.match(r"^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.(.*)$", key)
    if match:
        block, part, rest = match.groups()
        part = "block" if part == "resnets" else "upsample"
        key = f"decoder.up.{up_blocks - 1 - int(block)}.{part}.{rest}"
    for pattern, replacement in VAE_RULES:
        key = re.sub(pattern, replacement, key)
    return key


# OpenCLIP's names of a CLIP layer's weights (SDXL's second encoder); q, k and v are packed
OPEN_CLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
OPEN_CLIP_TOP = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}


def _unet(pipe: Any) -> dict[str, Any]:
    unet = {diffusers: ldm for ldm, diffusers in unet_pairs(pipe.unet.config).items()}
    state = {}
    for key, tensor in pipe.unet.state_dict().items():
        module, _, param = key.rpartition(".")
        state[f"model.diffusion_model.{unet[module]}.{param}"] = tensor
    return state


def _vae(pipe: Any) -> dict[str, Any]:
    up_blocks, state = len(pipe.vae.config.up_block_types), {}
    for key, tensor in pipe.vae.state_dict().items():
        name = vae_ldm_name(key, up_blocks)
        attention = ".mid.attn_1." in name and tensor.ndim == 2
        state[f"first_stage_model.{name}"] = tensor[:, :, None, None] if attention else tensor
    return state


def _clip(text_encoder: Any, prefix: str) -> dict[str, Any]:
    """A transformers CLIP text model under ``prefix``, with transformers 4's ``text_model.``."""
    state = {}
    for key, tensor in text_encoder.state_dict().items():
        key = key if key.startswith(TE_ROOT) else TE_ROOT + key
        state[prefix + key] = tensor
    return state


def open_clip(text_encoder: Any, prefix: str) -> dict[str, Any]:
    """A transformers CLIP text model with projection in OpenCLIP's layout under ``prefix``:
    the q, k, v projections of each layer in one ``attn.in_proj_weight`` / ``_bias``, the
    projection transposed."""
    weights = {k.removeprefix(TE_ROOT): t for k, t in text_encoder.state_dict().items()}
    state = {prefix + "text_projection": weights.pop("text_projection.weight").T.contiguous()}
    for key, name in OPEN_CLIP_TOP.items():
        state[prefix + name] = weights.pop(key)
    layers = re.compile(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$")
    packed: dict[tuple[str, str], dict[str, Any]] = {}
    for key, tensor in weights.items():
        match = layers.match(key)
        if match is None:
            continue  # buffers (position ids): OpenCLIP has none
        layer, part, kind = match.groups()
        if part.startswith("self_attn.") and part[-6:] in ("q_proj", "k_proj", "v_proj"):
            packed.setdefault((layer, kind), {})[part[-6]] = tensor
            continue
        state[f"{prefix}transformer.resblocks.{layer}.{OPEN_CLIP_LAYER[part]}.{kind}"] = tensor
    for (layer, kind), parts in packed.items():
        joined = torch.cat([parts["q"], parts["k"], parts["v"]])
        state[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{kind}"] = joined
    return state


def ldm_checkpoint(pipe: Any) -> dict[str, Any]:
    """A Stable Diffusion 1.x/2.x or SDXL pipeline's weights as one LDM (single-file) state
    dict: the layout AUTOMATIC1111 and ComfyUI checkpoints have (SDXL's text encoders under
    ``conditioner.embedders.0`` / ``.1``, the second in OpenCLIP's layout)."""
    state = _unet(pipe) | _vae(pipe)
    if getattr(pipe, "text_encoder_2", None) is None:
        return state | _clip(pipe.text_encoder, "cond_stage_model.transformer.")
    state |= _clip(pipe.text_encoder, "conditioner.embedders.0.transformer.")
    return state | open_clip(pipe.text_encoder_2, "conditioner.embedders.1.model.")
