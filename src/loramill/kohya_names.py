"""kohya's naming of LoRA modules, shared by exporting (peft → kohya) and by incremental
training from kohya files (kohya → peft): ``lora_unet_`` / ``lora_te_`` plus the module path
with dots turned into underscores, then ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.
"""

from __future__ import annotations

KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# peft suffix -> kohya suffix; nothing else (biases, DoRA magnitudes) has a kohya spelling.
PEFT_SUFFIXES = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight"}
# A1111 and ComfyUI map SD1.x text-encoder keys by the transformers-4 module path, which had
# a `text_model.` level that transformers 5's CLIPTextModel no longer has.
TE_ROOT = "text_model."


def kohya_module(component: str, module: str) -> str:
    """``unet`` + ``down_blocks.0.attentions.0…to_q`` → ``lora_unet_down_blocks_0_…_to_q``."""
    if component == "text_encoder" and not module.startswith(TE_ROOT):
        module = TE_ROOT + module
    return KOHYA_PREFIXES[component] + module.replace(".", "_")
