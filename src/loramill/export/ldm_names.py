"""Where AUTOMATIC1111 and ComfyUI put each module of a kohya-named LoRA.

Both tools apply LoRAs to the original (CompVis / LDM) layout of Stable Diffusion, not to
diffusers' one, and each has its own rule for turning a kohya key (``lora_unet_`` + the
diffusers module path with dots as underscores) into an LDM module:

- AUTOMATIC1111 rewrites the underscore name with regular expressions (block indices
  1 + 3·block + layer, ResNet parts renamed), then looks it up among the LDM model's module
  names with dots as underscores;
- ComfyUI builds a table from the UNet's config pairing every diffusers module path with its
  LDM module, and looks the kohya key up in it; its text-encoder keys are the CLIP layers'.

Both are implemented here from the tools' documented behaviour, with the LDM layout they map
into, generated from the diffusers UNet config. A key that lands nowhere is a LoRA module the
tool silently skips: export verification (loramill.export.verify) refuses it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# LDM ResBlock parts by their diffusers names (both tools use these pairs)
RESNET_PARTS = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
TRANSFORMER_BLOCK_PARTS = (
    "norm1", "norm2", "norm3", "ff.net.0.proj", "ff.net.2",
    *(f"attn{a}.{p}" for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")),
)  # fmt: skip
CLIP_LAYER_PARTS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
    "mlp.fc1", "mlp.fc2",
)  # fmt: skip


def _resnet(ldm: str, diffusers: str, shortcut: bool) -> Iterator[tuple[str, str]]:
    for part, ldm_part in RESNET_PARTS.items():
        if part != "conv_shortcut" or shortcut:
            yield f"{ldm}.{ldm_part}", f"{diffusers}.{part}"


def _transformer(ldm: str, diffusers: str, depth: int) -> Iterator[tuple[str, str]]:
    for part in ("norm", "proj_in", "proj_out"):
        yield f"{ldm}.{part}", f"{diffusers}.{part}"
    for block in range(depth):
        for part in TRANSFORMER_BLOCK_PARTS:
            name = f"transformer_blocks.{block}.{part}"
            yield f"{ldm}.{name}", f"{diffusers}.{name}"


def unet_pairs(config: Any) -> dict[str, str]:
    """LDM module path → diffusers module path for every weighted module of a UNet with this
    diffusers config (SD1.x/2.x: one transformer block per attention, as in their configs)."""
    channels, per_block = list(config["block_out_channels"]), config["layers_per_block"]
    attention = [t.startswith("CrossAttn") for t in config["down_block_types"]]
    up_attention = [t.startswith("CrossAttn") for t in config["up_block_types"]]
    pairs = {"input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
    pairs |= {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2"}
    out_channels = channels[0]
    for i, width in enumerate(channels):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            ldm, diffusers = f"input_blocks.{index}", f"down_blocks.{i}"
            pairs |= _resnet(f"{ldm}.0", f"{diffusers}.resnets.{j}", out_channels != width)
            out_channels = width
            if attention[i]:
                pairs |= _transformer(f"{ldm}.1", f"{diffusers}.attentions.{j}", 1)
        if i < len(channels) - 1:
            index = (i + 1) * (per_block + 1)
            pairs[f"input_blocks.{index}.0.op"] = f"down_blocks.{i}.downsamplers.0.conv"
    pairs |= _resnet("middle_block.0", "mid_block.resnets.0", False)
    pairs |= _transformer("middle_block.1", "mid_block.attentions.0", 1)
    pairs |= _resnet("middle_block.2", "mid_block.resnets.1", False)
    for i in range(len(channels)):
        for j in range(per_block + 1):
            ldm, diffusers = f"output_blocks.{i * (per_block + 1) + j}", f"up_blocks.{i}"
            # every output ResBlock takes the skip connection's channels too: a 1×1 shortcut
            pairs |= _resnet(f"{ldm}.0", f"{diffusers}.resnets.{j}", True)
            if up_attention[i]:
                pairs |= _transformer(f"{ldm}.1", f"{diffusers}.attentions.{j}", 1)
        if i < len(channels) - 1:
            last = f"output_blocks.{i * (per_block + 1) + per_block}"
            position = 2 if up_attention[i] else 1
            pairs[f"{last}.{position}.conv"] = f"up_blocks.{i}.upsamplers.0.conv"
    return pairs


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


def ldm_checkpoint(pipe: Any) -> dict[str, Any]:
    """A Stable Diffusion 1.x/2.x pipeline's weights as one LDM (single-file) state dict:
    the layout AUTOMATIC1111 and ComfyUI checkpoints have."""
    unet = {diffusers: ldm for ldm, diffusers in unet_pairs(pipe.unet.config).items()}
    state: dict[str, Any] = {}
    for key, tensor in pipe.unet.state_dict().items():
        module, _, param = key.rpartition(".")
        state[f"model.diffusion_model.{unet[module]}.{param}"] = tensor
    up_blocks = len(pipe.vae.config.up_block_types)
    for key, tensor in pipe.vae.state_dict().items():
        name = vae_ldm_name(key, up_blocks)
        attention = ".mid.attn_1." in name and tensor.ndim == 2
        state[f"first_stage_model.{name}"] = tensor[:, :, None, None] if attention else tensor
    for key, tensor in pipe.text_encoder.state_dict().items():
        key = key if key.startswith("text_model.") else f"text_model.{key}"
        state[f"cond_stage_model.transformer.{key}"] = tensor
    return state


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


def _a1111_suffix(kind: str, rest: str) -> str:
    if kind != "resnets":
        return rest
    return RESNET_PARTS.get(rest, rest).replace(".", "_")


class LdmLayout:
    """An SD1.x model's LDM modules (dotted names, UNet under ``diffusion_model.``, the text
    encoder under ``transformer.``) and where each tool maps a kohya module into them."""

    def __init__(self, unet_config: Any, text_layers: int) -> None:
        pairs = unet_pairs(unet_config)
        self.modules = {"diffusion_model." + ldm for ldm in pairs} | text_encoder_layout(
            text_layers
        )
        # A1111 keys its table by the module names with dots as underscores
        self._a1111 = {name.replace(".", "_"): name for name in self.modules}
        self._ldm = {d: "diffusion_model." + ldm for ldm, d in pairs.items()}
        # ComfyUI (comfy/lora.py, model_lora_keys_unet/_clip): kohya keys by diffusers path
        # or by LDM name; diffusers-format keys by diffusers path, with or without `unet.`,
        # attention projections in the attention-processor spelling (`.processor.to_q`,
        # `.processor.to_out` without `.0`); text-encoder keys by the CLIP layer's path.
        comfy = {"lora_unet_" + d.replace(".", "_"): ldm for ldm, d in pairs.items()}
        comfy |= {"lora_unet_" + ldm.replace(".", "_"): ldm for ldm in pairs}
        for ldm, d in pairs.items():
            processor = d.replace(".to_", ".processor.to_")
            processor = processor[:-2] if processor.endswith(".to_out.0") else processor
            comfy |= {processor: ldm, "unet." + processor: ldm}
        self.comfyui_keys = {key: "diffusion_model." + ldm for key, ldm in comfy.items()}
        for layer in range(text_layers):
            for part in CLIP_LAYER_PARTS:
                target = f"transformer.text_model.encoder.layers.{layer}.{part}"
                key = f"lora_te_text_model_encoder_layers_{layer}_{part.replace('.', '_')}"
                self.comfyui_keys[key] = target
                self.comfyui_keys[f"text_encoder.text_model.encoder.layers.{layer}.{part}"] = target

    def a1111(self, kohya_module: str) -> str | None:
        """The module A1111 applies this kohya module to, or None (skipped)."""
        converted = a1111_name(kohya_module)
        return self._a1111.get(converted) if converted else None

    def comfyui(self, kohya_module: str) -> str | None:
        """The module ComfyUI applies this kohya module to, or None (skipped)."""
        return self.comfyui_keys.get(kohya_module)

    def ldm_module(self, component: str, module: str) -> str | None:
        """The LDM module a checkpoint module (peft path) is trained on, from the layout
        itself, not from any tool's name rule: where a client must land it."""
        if component == "unet":
            return self._ldm.get(module)
        path = module if module.startswith("text_model.") else "text_model." + module
        return "transformer." + path if "transformer." + path in self.modules else None


def a1111_name(kohya_module: str) -> str | None:
    """A1111's rewrite of an SD1.x kohya module name into an LDM module name (underscores),
    or None when none of its rules matches."""
    for pattern, build in A1111_UNET_RULES:
        match = re.fullmatch(pattern, kohya_module)
        if match:
            return "diffusion_model_" + build(_numbers(match))
    match = re.fullmatch(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", kohya_module)
    if match:
        return f"transformer_text_model_encoder_layers_{match[1]}_{match[2]}"
    return None
