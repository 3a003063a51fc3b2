"""The LoRA network a run trains: which modules get LoRA layers, at which rank, and kohya's
three dropouts.

``train.network_target`` picks the modules, found by the blocks they sit in as kohya's
``networks.lora`` finds them, so a "rank 8 kohya LoRA" here is the network users compare with:

- ``attention``: the attention projections only (UNet to_q/k/v/out, CLIP q/k/v/out_proj);
- ``kohya``: every Linear and 1×1 conv inside the UNet's transformer blocks (attention,
  feed-forward, proj_in/out) and CLIP's attention and MLP: 192 + 72 modules on SD1.5;
- ``kohya_conv``: also the ResNet, down- and upsampling blocks, their 3×3 convs at
  ``conv_rank`` / ``conv_alpha`` (LoCon).

A Flux transformer takes kohya's Flux targets (``kohya`` only: every Linear of its double and
single blocks, those ``train_blocks`` keeps; loramill.models.flux.layout); its CLIP-L as above.

The layers themselves are peft's; the modules are named in the adapter config, with the conv
modules' rank and alpha in its ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loramill import LoramillError
from loramill.models.checkpoint import component_order
from loramill.models.flux.layout import peft_targets
from loramill.models.network_targets import NETWORK_TARGETS

ATTENTION_PROJECTIONS = {
    "unet": ("to_q", "to_k", "to_v", "to_out.0"),
    "text_encoder": ("q_proj", "k_proj", "v_proj", "out_proj"),
}
# Blocks whose Linear and 1×1 conv layers kohya trains (class names, as kohya matches them).
KOHYA_BLOCKS = {
    "unet": ("Transformer2DModel",),
    "text_encoder": ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"),
}
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")


@dataclass(frozen=True)
class NetworkSpec:
    target: str = "kohya"
    rank: int = 8
    alpha: float = 8.0
    conv_rank: int | None = None  # the 3×3 convs of kohya_conv; None = rank
    conv_alpha: float | None = None  # None = alpha
    network_dropout: float = 0.0  # on the rank activations (after lora_down), rescaled
    rank_dropout: float = 0.0  # whole ranks per sample, rescaled
    module_dropout: float = 0.0  # the whole LoRA of a module per forward, not rescaled
    train_blocks: str = "all"  # a Flux transformer's blocks: all | double | single

    @classmethod
    def from_config(cls, cfg: Any) -> NetworkSpec:
        """The network a TrainConfig asks for."""
        names = ("rank", "alpha", "conv_rank", "conv_alpha")
        names += ("network_dropout", "rank_dropout", "module_dropout", "train_blocks")
        return cls(cfg.network_target, **{name: getattr(cfg, name) for name in names})

    @property
    def conv(self) -> tuple[int, float]:
        """Rank and alpha of the 3×3 conv layers."""
        alpha = self.alpha if self.conv_alpha is None else self.conv_alpha
        return self.conv_rank or self.rank, float(alpha)

    @property
    def has_dropout(self) -> bool:
        return bool(self.network_dropout or self.rank_dropout or self.module_dropout)


# Parts of a layer that peft has wrapped (also after its adapters are deleted): the wrapper
# stands for the layer it wraps, its parts are not layers of the model.
PEFT_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector"}


def _is_pointwise(module: torch.nn.Module) -> bool:
    """A Linear or a 1×1 conv: trained at the network's rank."""
    module = getattr(module, "base_layer", module)
    if isinstance(module, torch.nn.Linear):
        return True
    return isinstance(module, torch.nn.Conv2d) and tuple(module.kernel_size) == (1, 1)


def _inside(model: torch.nn.Module, blocks: tuple[str, ...]) -> dict[str, torch.nn.Module]:
    """Every module (by full name) inside a module whose class is one of ``blocks``."""
    found = {}
    for name, block in model.named_modules():
        if type(block).__name__ in blocks:
            for child, module in block.named_modules():
                if child and not PEFT_PARTS & set(child.split(".")):
                    found[f"{name}.{child}" if name else child] = module
    return found


def network_modules(
    model: torch.nn.Module, component: str, target: str, train_blocks: str = "all"
) -> dict[str, str]:
    """The modules ``target`` puts LoRA layers on: full module name → ``rank`` or ``conv``.
    ``component``: the pipeline component; every text encoder (SDXL's two, Flux's CLIP-L) is
    a CLIP."""
    if target not in NETWORK_TARGETS:
        raise LoramillError(f"train.network_target '{target}': use {' | '.join(NETWORK_TARGETS)}")
    if component == "transformer":  # Flux: kohya's targets (the workflow refuses the others)
        return dict.fromkeys(sorted(peft_targets(model.config, train_blocks)), "rank")
    component = "unet" if component == "unet" else "text_encoder"
    if target == "attention":
        ends = tuple("." + p for p in ATTENTION_PROJECTIONS[component])
        return {
            n: "rank" for n, m in model.named_modules() if n.endswith(ends) and _is_pointwise(m)
        }
    chosen = {
        n: "rank" for n, m in _inside(model, KOHYA_BLOCKS[component]).items() if _is_pointwise(m)
    }
    if target == "kohya_conv" and component == "unet":
        for name, module in _inside(model, CONV_BLOCKS).items():
            if _is_pointwise(module):
                chosen[name] = "rank"
            elif isinstance(getattr(module, "base_layer", module), torch.nn.Conv2d):
                chosen[name] = "conv"
    return dict(sorted(chosen.items()))


def lora_config(modules: dict[str, str], spec: NetworkSpec, init: bool | str = True) -> Any:
    from peft import LoraConfig

    conv = sorted(n for n, kind in modules.items() if kind == "conv")
    conv_rank, conv_alpha = spec.conv
    return LoraConfig(
        r=spec.rank,
        lora_alpha=float(spec.alpha),
        target_modules=sorted(modules),
        rank_pattern={n: conv_rank for n in conv},
        alpha_pattern={n: conv_alpha for n in conv},
        init_lora_weights=init,
    )


def add_lora(models: dict[str, Any], spec: NetworkSpec, init: bool | str = True) -> None:
    """Freeze the base weights and add trainable LoRA layers to ``models`` (pipeline component
    name → model), the UNet first: LoRA init draws from torch's global generator."""
    for component in sorted(models, key=component_order):
        model = models[component]
        model.requires_grad_(False)
        modules = network_modules(model, component, spec.target, spec.train_blocks)
        model.add_adapter(lora_config(modules, spec, init))
        if spec.has_dropout:
            add_dropout(model, spec)


def add_dropout(model: torch.nn.Module, spec: NetworkSpec) -> None:
    """kohya's network, rank and module dropout on every LoRA layer of ``model``, in training
    mode only. They act on lora_down's output, so they are hooks on peft's lora_A.

    Draws come from torch's global generators: their state is saved with every checkpoint
    (exact resume) and gradient checkpointing replays them when it recomputes a forward.
    """
    from peft.tuners.lora import LoraLayer

    def hook(module: torch.nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return out
        if spec.module_dropout and torch.rand(1).item() < spec.module_dropout:
            return out * 0  # lora_B has no bias: the module adds nothing this forward
        if spec.network_dropout:
            out = torch.nn.functional.dropout(out, p=spec.network_dropout)
        if spec.rank_dropout:
            out = out * _rank_mask(out, spec.rank_dropout)
        return out

    for layer in model.modules():
        if isinstance(layer, LoraLayer):
            for down in layer.lora_A.values():
                down.register_forward_hook(hook)


def _rank_mask(out: torch.Tensor, p: float) -> torch.Tensor:
    """Keep each rank of each sample with probability 1 - p, rescaled as if the rank were
    smaller. lora_down's output has its ranks last, or second for a conv (B, r, H, W)."""
    conv = out.ndim == 4
    ranks = out.shape[1] if conv else out.shape[-1]
    keep = torch.rand(out.shape[0], ranks, device=out.device) > p
    shape = (out.shape[0], ranks, 1, 1) if conv else (out.shape[0], *[1] * (out.ndim - 2), ranks)
    return keep.reshape(shape).to(out.dtype) / (1.0 - p)
