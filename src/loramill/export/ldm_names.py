"""Where AUTOMATIC1111 and ComfyUI put each module of a kohya-named LoRA.

Both tools apply LoRAs to the original (CompVis / LDM) layout of Stable Diffusion, not to
diffusers' one, and each has its own rule for turning a kohya key into an LDM module:

- AUTOMATIC1111 rewrites the underscore name with regular expressions (block indices
  1 + 3·block + layer, ResNet parts renamed), then looks it up among the LDM model's module
  names with dots as underscores; names already in the LDM layout (kohya's SDXL ones) only
  have their prefix replaced (``a1111_lookup``);
- ComfyUI builds a table from the UNet's config pairing every diffusers module path with its
  LDM module, and looks the kohya key up in it; its text-encoder keys are the CLIP layers'.

Both are implemented here from the tools' own loaders, with the LDM layout they map into
generated from the diffusers UNet config (``unet_pairs``: per-level depths, SDXL's
``label_emb``). A key that lands nowhere is a LoRA module the tool silently skips: export
verification (loramill.export.verify) refuses it. SDXL's text encoders: loramill.export.
sdxl_layout.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from loramill.models.kohya_names import TE_ROOT
from loramill.models.ldm_unet import RESNET_PARTS, unet_pairs

# LDM ResBlock parts by their diffusers names (both tools use these pairs)
CLIP_LAYER_PARTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "mlp.fc1", "mlp.fc2",
)  # fmt: skip


def text_encoder_layout(layers: int) -> set[str]:
    """The SD1.x text encoder's LoRA-able modules as A1111 names them (the CLIP model sits at
    ``transformer`` in the LDM model, transformers 4's ``text_model`` level included)."""
    return {
        f"transformer.text_model.encoder.layers.{i}.{part}"
        for i in range(layers)
        for part in CLIP_LAYER_PARTS
    }


def _numbers(match: re.Match) -> list[Any]:
    return [int(g) if g.isdigit() else g for g in match.groups()]


A1111_UNET_RULES = [
    (r"lora_unet_conv_in(.*)", lambda m: f"input_blocks_0_0{m[0]}"),
    (r"lora_unet_conv_out(.*)", lambda m: f"out_2{m[0]}"),
    (r"lora_unet_time_embedding_linear_(\d+)(.*)", lambda m: f"time_embed_{m[0] * 2 - 2}{m[1]}"),
    (
        r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
        lambda m: (
            f"input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_"
            + _a1111_suffix(m[1], m[3])
        ),
    ),
    (
        r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
        lambda m: (
            f"middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_" + _a1111_suffix(m[0], m[2])
        ),
    ),
    (
        r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
        lambda m: (
            f"output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_"
            + _a1111_suffix(m[1], m[3])
        ),
    ),
    (
        r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
        lambda m: f"input_blocks_{3 + m[0] * 3}_0_op",
    ),
    (
        r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
        lambda m: f"output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv",
    ),
]
# A1111's OpenCLIP names of a CLIP layer's parts (SDXL's second encoder); the q/k/v
# projections are slices of the layer's packed attention (``x_proj``)
OPEN_CLIP_PARTS = {"mlp_fc1": "mlp_c_fc", "mlp_fc2": "mlp_c_proj", "self_attn": "attn"}
X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")


def _a1111_suffix(kind: str, rest: str) -> str:
    if kind != "resnets":
        return rest
    return RESNET_PARTS.get(rest, rest).replace(".", "_")


def a1111_name(kohya_module: str) -> str | None:
    """A1111's rewrite of a kohya module name (``convert_diffusers_name_to_compvis``) into an
    LDM module name (underscores), or None when none of its rules matches."""
    for pattern, build in A1111_UNET_RULES:
        match = re.fullmatch(pattern, kohya_module)
        if match:
            return "diffusion_model_" + build(_numbers(match))
    # (on an SD2.x model A1111 sends lora_te_ to OpenCLIP names; SD2's text encoder is not
    # checked against A1111: loramill.export.verify)
    match = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", kohya_module)
    if match:
        return f"transformer_text_model_encoder_layers_{match[1]}_{match[2]}"
    match = re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", kohya_module)
    if match:
        part = match[2]
        for clip, open_clip in OPEN_CLIP_PARTS.items():
            part = part.replace(clip, open_clip)
        return f"1_model_transformer_resblocks_{match[1]}_{part}"
    return None


def a1111_lookup(
    kohya_module: str, modules: Mapping[str, str], packed: Mapping[str, str]
) -> str | None:
    """Where A1111 (``networks.load_network``) puts a kohya module, or None (skipped).

    ``modules``: the model's LoRA-able modules by A1111's name for them (dots as
    underscores) → target; ``packed``: its packed attentions (OpenCLIP's, q/k/v in one
    ``in_proj_weight``) likewise. In A1111's order: the name its rules convert to; a q/k/v
    projection's packed attention (target ``<attention>.in_proj_weight[q]``…); a name already
    in the LDM layout (kohya's SDXL names) with ``lora_unet`` replaced by
    ``diffusion_model``, or ``lora_te1_text_model`` by the first encoder's name.
    """
    key = a1111_name(kohya_module) or kohya_module  # A1111 keeps a name no rule matches
    if key in modules:
        return modules[key]
    match = X_PROJ.fullmatch(key)
    if match and match[1] in packed:
        return f"{packed[match[1]]}.in_proj_weight[{match[2][0]}]"
    if "lora_unet" in kohya_module:
        return modules.get(kohya_module.replace("lora_unet", "diffusion_model"))
    if "lora_te1_text_model" in kohya_module:
        for ldm in ("0_transformer_text_model", "transformer_text_model"):  # SDXL, then SD1
            found = modules.get(kohya_module.replace("lora_te1_text_model", ldm))
            if found:
                return found
    return None


def comfyui_unet_keys(pairs: Mapping[str, str]) -> dict[str, str]:
    """ComfyUI's UNet keys (comfy/lora.py ``model_lora_keys_unet``) → LDM module: kohya keys by
    diffusers path or by LDM name; diffusers-format keys by diffusers path, with or without
    ``unet.``, attention projections in the attention-processor spelling (``.processor.to_q``,
    ``.processor.to_out`` without ``.0``)."""
    comfy = {"lora_unet_" + d.replace(".", "_"): ldm for ldm, d in pairs.items()}
    comfy |= {"lora_unet_" + ldm.replace(".", "_"): ldm for ldm in pairs}
    for ldm, d in pairs.items():
        processor = d.replace(".to_", ".processor.to_")
        processor = processor[:-2] if processor.endswith(".to_out.0") else processor
        comfy |= {processor: ldm, "unet." + processor: ldm}
    return {key: "diffusion_model." + ldm for key, ldm in comfy.items()}


class LdmLayout:
    """An SD1.x/2.x model's LDM modules (dotted names, UNet under ``diffusion_model.``, the
    text encoder under ``transformer.``) and where each tool maps a kohya module into them."""

    packed: frozenset[str] = frozenset()  # CLIP-L has no packed attention

    def __init__(self, unet_config: Any, text_layers: int) -> None:
        pairs = unet_pairs(unet_config)
        self.modules = {"diffusion_model." + ldm for ldm in pairs} | text_encoder_layout(
            text_layers
        )
        # A1111 keys its table by the module names with dots as underscores
        self._a1111 = {name.replace(".", "_"): name for name in self.modules}
        self._ldm = {d: "diffusion_model." + ldm for ldm, d in pairs.items()}
        # ComfyUI (comfy/lora.py, model_lora_keys_unet/_clip): text-encoder keys by the CLIP
        # layer's path, kohya's and diffusers' spelling
        self.comfyui_keys = comfyui_unet_keys(pairs)
        for layer in range(text_layers):
            for part in CLIP_LAYER_PARTS:
                target = f"transformer.text_model.encoder.layers.{layer}.{part}"
                key = f"lora_te_text_model_encoder_layers_{layer}_{part.replace('.', '_')}"
                self.comfyui_keys[key] = target
                self.comfyui_keys[f"text_encoder.text_model.encoder.layers.{layer}.{part}"] = target

    def a1111(self, kohya_module: str) -> str | None:
        """The module A1111 applies this kohya module to, or None (skipped)."""
        return a1111_lookup(kohya_module, self._a1111, {})

    def comfyui(self, kohya_module: str) -> str | None:
        """The module ComfyUI applies this kohya module to, or None (skipped)."""
        return self.comfyui_keys.get(kohya_module)

    def ldm_module(self, component: str, module: str) -> str | None:
        """The LDM module a checkpoint module (peft path) is trained on, from the layout
        itself, not from any tool's name rule: where a client must land it."""
        if component == "unet":
            return self._ldm.get(module)
        path = module if module.startswith(TE_ROOT) else TE_ROOT + module
        return "transformer." + path if "transformer." + path in self.modules else None
