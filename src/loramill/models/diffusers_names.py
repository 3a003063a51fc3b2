"""Key names of the diffusers-format export: one spelling that diffusers and ComfyUI both map.

- ComfyUI maps a diffusers-format UNet key by the module's diffusers path with the attention
  projections in the attention-processor spelling diffusers used before peft
  (``unet.<block>.attn1.processor.to_q``, ``….processor.to_out``, no ``.0``); peft's
  ``unet.<block>.attn1.to_q`` is none of its keys ("lora key not loaded").
- diffusers turns exactly that older spelling (``….processor.to_q_lora.down.weight``,
  ``<module>.lora.down.weight``) into peft keys — the spelling its own kohya conversion goes
  through — but only when the UNet's first key has no ``lora_A``, so every UNet key is written
  in it.
- Both read the text encoder under peft's ``text_encoder.text_model.….lora_A.weight``.

Neither client reads the other's alpha (ComfyUI only ``<key>.alpha`` tensors, which diffusers
refuses in a file of this format), so the export writes alpha = rank and multiplies each
module's ``lora_B`` by its trained scale (loramill.export.write.to_diffusers).
"""

from __future__ import annotations

import re

# peft module path of a UNet attention projection: (parent, projection)
ATTENTION = re.compile(r"^(.+)\.(to_q|to_k|to_v|to_out\.0)$")
LEGACY_ATTENTION = re.compile(
    r"^unet\.(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$"
)
LEGACY_PLAIN = re.compile(r"^unet\.(.+)\.lora\.(down|up)\.weight$")
SIDES = {"A": "down", "B": "up"}


def diffusers_key(component: str, module: str, part: str) -> str:
    """The export key of ``lora_<part>`` (``A`` or ``B``) of a checkpoint module."""
    if component != "unet":
        return f"{component}.{module}.lora_{part}.weight"
    side = SIDES[part]
    match = ATTENTION.match(module)
    if match:
        projection = match[2].removesuffix(".0")
        return f"unet.{match[1]}.processor.{projection}_lora.{side}.weight"
    return f"unet.{module}.lora.{side}.weight"


def checkpoint_key(key: str) -> str:
    """The checkpoint (peft) key of an export key: the inverse of ``diffusers_key``."""
    part = {side: name for name, side in SIDES.items()}
    match = LEGACY_ATTENTION.match(key)
    if match:
        parent, projection, side = match.groups()
        projection += ".0" if projection == "to_out" else ""
        return f"unet.{parent}.{projection}.lora_{part[side]}.weight"
    match = LEGACY_PLAIN.match(key)
    if match:
        return f"unet.{match[1]}.lora_{part[match[2]]}.weight"
    return key
