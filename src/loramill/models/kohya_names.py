"""kohya's module names for each model family, as kohya sd-scripts' ``networks/lora.py`` gives
them: a prefix per component, then the module's path in kohya's own model with dots as
underscores.

- SD1.x/2.x: ``lora_unet_`` + the diffusers UNet path (kohya trains SD on diffusers' UNet),
  ``lora_te_`` + the CLIP path with transformers 4's ``text_model.`` level;
- SDXL: kohya trains on its own UNet in the original (LDM) layout
  (``library/sdxl_original_unet.py``), so ``lora_unet_`` + the LDM path
  (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, from
  loramill.models.ldm_unet.unet_pairs and the base model's UNet config); ``lora_te1_`` /
  ``lora_te2_`` + each encoder's transformers path (``LORA_PREFIX_TEXT_ENCODER1`` / ``2``).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from loramill import LoramillError
from loramill.models.checkpoint import PROVENANCE_KEY, Checkpoint
from loramill.models.families import family_code, unet_family
from loramill.models.ldm_unet import unet_pairs

# A1111 and ComfyUI map SD1.x text-encoder keys by the transformers-4 module path, which had
# a `text_model.` level that transformers 5's CLIPTextModel no longer has.
TE_ROOT = "text_model."
# diffusers reads a file as kohya's when every key has one of these prefixes
KOHYA_KEY_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


class KohyaNames:
    """kohya's name of every module of one base model (SDXL's depend on its UNet config)."""

    def __init__(self, family: str, unet_config: Mapping[str, Any] | None = None) -> None:
        self.family = "sdxl" if family == "sdxl" else "sd"  # sd1 and sd2 are named alike
        self.prefixes = family_code(family).kohya_prefixes
        self._unet: dict[str, str] | None = None
        if self.family == "sdxl":
            if unet_config is None:
                raise LoramillError(
                    "an SDXL adapter's kohya names are its base UNet's LDM layout: "
                    "the base model's UNet config is needed"
                )
            self._unet = {d: ldm for ldm, d in unet_pairs(unet_config).items()}

    def module(self, component: str, module: str) -> str:
        """The kohya name of a module (peft path) of a pipeline component; raises for one
        kohya has no name for."""
        prefix = self.prefixes.get(component)
        if prefix is None:
            raise LoramillError(
                f"unknown component '{component}' (expected {' or '.join(self.prefixes)})"
            )
        if component != "unet":
            # transformers 5's CLIPTextModel lost the level its CLIPTextModelWithProjection keeps
            module = module if module.startswith(TE_ROOT) else TE_ROOT + module
        elif self._unet is not None:
            ldm = self._unet.get(module)
            if ldm is None:
                raise LoramillError(f"'{module}' is no weighted module of the SDXL UNet's layout")
            module = ldm
        return f"{prefix}_{module.replace('.', '_')}"

    def component_of(self, name: str) -> str | None:
        """The component a kohya module name belongs to, or None (another family's name)."""
        for component, prefix in self.prefixes.items():
            if name.startswith(prefix + "_"):
                return component
        return None


def checkpoint_family(checkpoint: Checkpoint) -> str:
    """``sdxl`` for a checkpoint trained on SDXL, else ``sd``: as its provenance says, or
    without one by its components (SDXL has a second text encoder)."""
    try:
        provenance = json.loads(checkpoint.metadata.get(PROVENANCE_KEY) or "{}")
    except json.JSONDecodeError:
        provenance = None  # the export says what is wrong with it (loramill.export.metadata)
    if isinstance(provenance, dict) and ("family" in provenance or "base_version" in provenance):
        sdxl = "sdxl" in (provenance.get("family"), provenance.get("base_version"))
        return "sdxl" if sdxl else "sd"
    return "sdxl" if "text_encoder_2" in checkpoint.components else "sd"


def base_unet_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The UNet config of the base model a checkpoint was trained on (its provenance's
    ``base_model``, a local folder or a hub id in the local cache)."""
    from loramill.models.base_model import model_folder

    provenance = json.loads(checkpoint.metadata.get(PROVENANCE_KEY) or "{}")
    spec = provenance.get("base_model") if isinstance(provenance, dict) else None
    if not spec:
        raise LoramillError("checkpoint names no base_model: its UNet's layout is unknown")
    path = model_folder(str(spec)) / "unet" / "config.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise LoramillError(f"{path}: cannot read the base model's UNet config ({error})") from None


def checkpoint_names(
    checkpoint: Checkpoint, unet_config: Mapping[str, Any] | None = None
) -> KohyaNames:
    """kohya's names for a checkpoint's modules: its family's, with SDXL's UNet layout from
    ``unet_config`` or else from its base model's."""
    family = checkpoint_family(checkpoint)
    if family == "sdxl" and unet_config is None:
        unet_config = base_unet_config(checkpoint)
    return KohyaNames(family, unet_config)


def model_names(models: Mapping[str, Any]) -> KohyaNames:
    """kohya's names for a base model's UNet and text encoders (pipeline component name →
    model): SDXL's for a UNet with SDXL's size and crop conditioning."""
    config = models["unet"].config
    return KohyaNames(unet_family(config), config)


def kohya_file_modules(keys: Iterable[str], names: KohyaNames) -> dict[str, set[str]]:
    """The LoRA modules a kohya file's tensor keys name, by component of ``names``' family;
    keys of no component (another format or family) are left out."""
    modules: dict[str, set[str]] = {component: set() for component in names.prefixes}
    for key in keys:
        name = key.split(".", 1)[0]
        component = names.component_of(name)
        if component is not None:
            modules[component].add(name)
    return modules


def loaded_lora_modules(
    models: Mapping[str, Any], adapter: str, names: KohyaNames
) -> dict[str, dict[str, Any]]:
    """The LoRA layers of ``adapter`` in each model, by kohya name: what a loader really
    placed, to hold against what a file names."""
    from peft.tuners.lora import LoraLayer

    return {
        component: {
            names.module(component, path): layer
            for path, layer in model.named_modules()
            if isinstance(layer, LoraLayer) and adapter in layer.lora_A
        }
        for component, model in models.items()
    }
