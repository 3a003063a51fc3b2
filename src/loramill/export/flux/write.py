"""The files of a Flux.1 or Chroma checkpoint: kohya sd-scripts' Flux LoRA (``networks/
lora_flux.py``) and the diffusers-format file (loramill.export.write.to_diffusers).

kohya's file names the transformer's modules in Black Forest Labs' layout, fused projections
whole (loramill.export.flux.kohya), and CLIP-L as ``lora_te1_text_model_encoder_layers_…``:
lora_flux's prefix for CLIP-L, the path as kohya names CLIP everywhere
(loramill.models.kohya_names). T5 is never trained (the family's ``trainable_encoders``), so a
checkpoint with any other component is refused rather than written without it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loramill import LoramillError
from loramill.export.flux.kohya import to_bfl_kohya
from loramill.export.write import kohya_alpha, lora_pairs, to_kohya
from loramill.models.checkpoint import Checkpoint
from loramill.models.kohya_names import KohyaNames

if TYPE_CHECKING:
    import torch

DENOISER = "transformer"


@dataclass(frozen=True)
class FluxBase:
    """What a Flux-family export is written against: the base model's family code
    (loramill.models.flux.family.Flux), its transformer's config, and ModelSpec's
    architecture label of a LoRA on it (FLUX.1 [dev] or [schnell], Chroma)."""

    family: Any
    config: Mapping[str, Any]
    architecture: str

    @classmethod
    def of(cls, pipe: Any) -> FluxBase:
        from loramill.models.base_model import pipeline_family

        family = pipeline_family(pipe)
        return cls(family, dict(pipe.transformer.config), family.architecture(pipe))

    def kohya(self, checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
        return flux_kohya(checkpoint, self)

    @property
    def components(self) -> tuple[str, ...]:
        """The components its kohya file can hold: the transformer and CLIP-L (FLUX.1)."""
        return (DENOISER, *self.family.trainable_encoders)


def flux_kohya(checkpoint: Checkpoint, base: FluxBase) -> dict[str, torch.Tensor]:
    """kohya's Flux LoRA tensors of a checkpoint, each module's true ``.alpha`` included."""
    if stray := [c for c in checkpoint.components if c not in base.components]:
        raise LoramillError(
            f"'{stray[0]}' LoRA tensors: kohya's {base.family.name} export holds "
            f"{' and '.join(base.components)} LoRAs only"
        )
    parts = {DENOISER: {}, "text": {}}
    for key, tensor in checkpoint.tensors.items():
        parts[DENOISER if key.startswith(DENOISER + ".") else "text"][key] = tensor
    denoiser, text = (Checkpoint(parts[p], {}, checkpoint.adapter_configs) for p in parts)
    pairs = {module: pair for (_, module), pair in lora_pairs(denoiser, (DENOISER,)).items()}
    alphas = {module: kohya_alpha(checkpoint, DENOISER, module) for module in pairs}
    out = to_bfl_kohya(pairs, alphas, base.config)
    if text.tensors:  # CLIP-L: kohya's CLIP names under lora_flux's prefix (family.kohya_prefixes)
        out |= to_kohya(text, KohyaNames(base.family.name))
    return out
