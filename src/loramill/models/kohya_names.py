"""kohya's naming of LoRA modules, shared by exporting (peft → kohya) and by incremental
training from kohya files (kohya → peft): ``lora_unet_`` / ``lora_te_`` plus the module path
with dots turned into underscores, then ``.lora_down.weight``, ``.lora_up.weight``, ``.alpha``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

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


def kohya_file_modules(keys: Iterable[str]) -> dict[str, set[str]]:
    """The LoRA modules a kohya file's tensor keys name, by component; keys of no component
    (not kohya spelling) are left out, so a file of another format names none."""
    modules: dict[str, set[str]] = {component: set() for component in KOHYA_PREFIXES}
    for key in keys:
        name = key.split(".", 1)[0]
        for component, prefix in KOHYA_PREFIXES.items():
            if name.startswith(prefix):
                modules[component].add(name)
    return modules


def loaded_lora_modules(models: dict[str, Any], adapter: str) -> dict[str, dict[str, Any]]:
    """The LoRA layers of ``adapter`` in each model (component → model), by kohya name: what a
    loader really placed, to hold against what the file names."""
    from peft.tuners.lora import LoraLayer

    found: dict[str, dict[str, Any]] = {}
    for component, model in models.items():
        found[component] = {
            kohya_module(component, name): layer
            for name, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A
        }
    return found
