"""SDXL's LDM layout — the modules of a single-file SDXL checkpoint (``sd_xl_base_1.0.safetensors``)
— and where AUTOMATIC1111 and ComfyUI put each module of a kohya-named SDXL LoRA in it.

The UNet's modules are those of loramill.export.ldm_names.unet_pairs under
``diffusion_model.``; the two text encoders sit in the checkpoint as
``conditioner.embedders.0.transformer.text_model.…`` (CLIP ViT-L, transformers' layout) and
``conditioner.embedders.1.model.transformer.resblocks.…`` (OpenCLIP ViT-bigG's own layout:
the q, k and v projections packed into one ``attn.in_proj_weight``, written here as
``attn.in_proj_weight[q]``…, ``mlp.c_fc`` / ``mlp.c_proj`` for ``fc1`` / ``fc2``).

- AUTOMATIC1111 (``extensions-builtin/Lora/networks.py``): modules named after their path in
  the conditioner's embedders (``0_transformer_text_model_…``, ``1_model_transformer_…``)
  and the UNet's (``diffusion_model_…``); kohya's SDXL UNet names are LDM names already, only
  ``lora_unet`` is replaced; ``lora_te1_text_model`` becomes ``0_transformer_text_model``;
  ``lora_te2_`` names are rewritten to OpenCLIP's (loramill.export.ldm_names.a1111_lookup).
  A packed attention gets its LoRA only when the file has all of q, k, v and out_proj.
- ComfyUI (``comfy/lora.py``): its SDXL model holds both encoders in transformers' layout
  (``clip_l.…``, ``clip_g.…``, converted on load from the checkpoint's); ``lora_te1_`` and
  ``text_encoder.`` keys go to ``clip_l``, ``lora_te2_`` and ``text_encoder_2.`` keys to
  ``clip_g``, for the first 32 layers; the UNet's keys as for SD (``comfyui_unet_keys``).
"""

from __future__ import annotations

from typing import Any

from loramill.export.client_rules import comfyui_clip_keys
from loramill.export.ldm_names import (
    CLIP_LAYER_PARTS,
    a1111_lookup,
    comfyui_unet_keys,
    unet_pairs,
)
from loramill.models.kohya_names import TE_ROOT

TEXT_1 = "conditioner.embedders.0.transformer.text_model.encoder.layers"
TEXT_2 = "conditioner.embedders.1.model.transformer.resblocks"
# a CLIP layer's parts as OpenCLIP's layer names them
OPEN_CLIP = {
    "self_attn.q_proj": "attn.in_proj_weight[q]",
    "self_attn.k_proj": "attn.in_proj_weight[k]",
    "self_attn.v_proj": "attn.in_proj_weight[v]",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def text_pairs(layers_1: int, layers_2: int) -> dict[tuple[str, str], str]:
    """(component, transformers module path) → LDM module of both encoders' LoRA-able layers."""
    pairs = {}
    for layer in range(layers_1):
        for part in CLIP_LAYER_PARTS:
            path = f"{TE_ROOT}encoder.layers.{layer}.{part}"
            pairs[("text_encoder", path)] = f"{TEXT_1}.{layer}.{part}"
    for layer in range(layers_2):
        for part in CLIP_LAYER_PARTS:
            path = f"{TE_ROOT}encoder.layers.{layer}.{part}"
            pairs[("text_encoder_2", path)] = f"{TEXT_2}.{layer}.{OPEN_CLIP[part]}"
    return pairs


def _a1111_names(
    unet: dict[str, str], layers_1: int, layers_2: int
) -> tuple[dict[str, str], dict[str, str]]:
    """A1111's names (network_layer_mapping) of the LoRA-able modules and of the packed
    attentions → their LDM names."""
    modules = {name.replace(".", "_"): name for name in unet}
    modules |= {
        f"0_{name.removeprefix('conditioner.embedders.0.').replace('.', '_')}": name
        for name in (
            f"{TEXT_1}.{layer}.{part}" for layer in range(layers_1) for part in CLIP_LAYER_PARTS
        )
    }
    packed = {}
    for layer in range(layers_2):
        attention = f"{TEXT_2}.{layer}.attn"
        short = f"1_model_transformer_resblocks_{layer}"
        packed[f"{short}_attn"] = attention
        for part in ("attn.out_proj", "mlp.c_fc", "mlp.c_proj"):
            modules[f"{short}_{part.replace('.', '_')}"] = f"{TEXT_2}.{layer}.{part}"
    return modules, packed


def _comfyui_clip_keys(layers_1: int, layers_2: int) -> dict[str, str]:
    keys = comfyui_clip_keys(
        "text_encoder", ("lora_te_", "lora_te1_"), layers_1,
        lambda layer, part: f"{TEXT_1}.{layer}.{part}",
    )  # fmt: skip
    return keys | comfyui_clip_keys(
        "text_encoder_2", ("lora_te2_",), layers_2,
        lambda layer, part: f"{TEXT_2}.{layer}.{OPEN_CLIP[part]}",
    )  # fmt: skip


class SdxlLayout:
    """An SDXL model's LDM modules and where each tool maps a kohya module into them (the
    interface of loramill.export.ldm_names.LdmLayout)."""

    def __init__(self, unet_config: Any, layers_1: int, layers_2: int) -> None:
        pairs = unet_pairs(unet_config)
        self._ldm = {d: "diffusion_model." + ldm for ldm, d in pairs.items()}
        self._text = text_pairs(layers_1, layers_2)
        self.modules = set(self._ldm.values()) | set(self._text.values())
        self._a1111, self._packed = _a1111_names(set(self._ldm.values()), layers_1, layers_2)
        self.packed = frozenset(self._packed.values())
        self.comfyui_keys = comfyui_unet_keys(pairs) | _comfyui_clip_keys(layers_1, layers_2)

    def a1111(self, kohya_module: str) -> str | None:
        """The module A1111 applies this kohya module to, or None (skipped)."""
        return a1111_lookup(kohya_module, self._a1111, self._packed)

    def comfyui(self, kohya_module: str) -> str | None:
        """The module ComfyUI applies this kohya module to, or None (skipped)."""
        return self.comfyui_keys.get(kohya_module)

    def ldm_module(self, component: str, module: str) -> str | None:
        """The LDM module a checkpoint module (peft path) is trained on, from the layout."""
        if component == "unet":
            return self._ldm.get(module)
        path = module if module.startswith(TE_ROOT) else TE_ROOT + module
        return self._text.get((component, path))
