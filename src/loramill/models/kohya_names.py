"""The parts of kohya's LoRA key names every family shares: the module name (its family's,
loramill.export.kohya_naming) then ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.
"""

from __future__ import annotations

# peft suffix -> kohya suffix; nothing else (biases, DoRA magnitudes) has a kohya spelling.
PEFT_SUFFIXES = {".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight"}
# A1111 and ComfyUI map SD1.x text-encoder keys by the transformers-4 module path, which had
# a `text_model.` level that transformers 5's CLIPTextModel no longer has.
TE_ROOT = "text_model."
