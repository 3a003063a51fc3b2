"""A LoHa, LoKr or DoRA file in the grid, drawn as AUTOMATIC1111 and ComfyUI draw it.

diffusers refuses LoHa's and LoKr's keys and drops DoRA's magnitudes, so these adapters are
applied the way their users' tools apply them: each module's weight becomes the clients'
patched weight at the cell's strength (loramill.export.client_rules.patched_weight, by the
rules the export's verification checks against the trained network). The base weights of the
modules it changes are kept, so a new strength or the next adapter starts from them exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.export.client_rules import lycoris_landed, patched_weight
from loramill.models.adapter_parts import kohya_groups
from loramill.models.kohya_names import KohyaNames, model_names


def _kohya_layers(models: dict[str, Any], names: KohyaNames) -> dict[str, tuple[str, Any]]:
    """kohya name → (component, layer) of every Linear and Conv2d of the models."""
    import torch

    layers = {}
    for component, model in models.items():
        for path, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                try:
                    layers[names.module(component, path)] = (component, layer)
                except LoramillError:  # a module kohya names none of (SDXL's embeddings)
                    continue
    return layers


class PatchedAdapter:
    """One LoHa, LoKr or DoRA file applied to the pipeline's weights (``models``: the components
    it may change, by pipeline name; ``denoiser``: the one the UNet strength is for)."""

    def __init__(
        self, models: dict[str, Any], denoiser: str, tensors: dict[str, Any], path: Path
    ) -> None:
        self.denoiser = denoiser
        layers = _kohya_layers(models, model_names(models))
        self.modules: list[tuple[str, Any, Any, dict[str, Any]]] = []
        for name, parts in sorted(kohya_groups(tensors).items()):
            pair = {"lora_up.weight", "lora_down.weight"} <= set(parts)
            if name not in layers or not (pair or lycoris_landed(parts, parts.get("alpha"))):
                raise LoramillError(
                    f"{path}: LoRA module {name} does not fit the base model (or is not a "
                    "LoRA, LoHa, LoKr or DoRA module)"
                )
            component, layer = layers[name]
            self.modules.append((component, layer, layer.weight.detach().clone(), parts))
        self.strengths: tuple[float, float] | None = None

    def apply(self, unet_strength: float, te_strength: float) -> None:
        """Set every changed weight to base + strength × delta (at these strengths)."""
        import torch

        if self.strengths == (unet_strength, te_strength):
            return
        with torch.no_grad():
            for component, layer, base, parts in self.modules:
                strength = unet_strength if component == self.denoiser else te_strength
                layer.weight.copy_(patched_weight(parts, base, strength))
        self.strengths = (unet_strength, te_strength)

    def remove(self) -> None:
        """Every changed weight back to the base model's, bit for bit."""
        import torch

        with torch.no_grad():
            for _, layer, base, _ in self.modules:
                layer.weight.copy_(base)
        self.strengths = None
