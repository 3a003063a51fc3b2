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

kohya's block-wise options (``block_dims``, ``block_alphas``, ``conv_block_dims``,
``conv_block_alphas``) give a UNet's modules the rank and alpha of their block
(loramill.models.unet_blocks); a block of rank 0, or of learning-rate weight 0 (kohya's
``down_lr_weight`` / ``mid_lr_weight`` / ``up_lr_weight``), has no LoRA layers.

The layers themselves are peft's (``network_type`` lora and dora: peft's LoRA, DoRA's magnitude
added by loramill.models.dora; loha and lokr: peft's LoHa and LoKr, LyCORIS's algorithms); the
modules are named in the adapter config, with the conv modules' rank and alpha, and any other
module's of its own, in its ``rank_pattern`` / ``alpha_pattern``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from loramill import LoramillError
from loramill.models.checkpoint import component_order
from loramill.models.dora import MAGNITUDE, add_dora
from loramill.models.flux.layout import peft_targets
from loramill.models.network_targets import NETWORK_TARGETS
from loramill.models.unet_blocks import (
    BLOCK_LR_OPTIONS,
    BLOCK_OPTIONS,
    LR_OPTIONS,
    block_lr_weights,
    sd_block,
    sdxl_block,
)

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
TYPE_OPTIONS = ("network_type", "factor", "decompose_both", "full_matrix")
# LoKr's full_matrix: a rank this high makes both of peft's factors full matrices (it
# decomposes a factor only below half its larger side), and alpha = rank its scale 1, as
# LyCORIS trains them
FULL_MATRIX_RANK = 2**20


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
    # kohya's block-wise ranks and alphas of a UNet's modules (unet_blocks); None: not set
    block_dims: tuple[int, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[int, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    # kohya's block learning-rate weights, as the config gives them (unet_blocks)
    down_lr_weight: tuple[float, ...] | str | None = None
    mid_lr_weight: tuple[float, ...] | None = None
    up_lr_weight: tuple[float, ...] | str | None = None
    block_lr_zero_threshold: float = 0.0
    network_type: str = "lora"  # lora | loha | lokr | dora (train.network_type)
    factor: int = -1  # lokr: LyCORIS's factor, decompose_both, full_matrix
    decompose_both: bool = False
    full_matrix: bool = False

    @classmethod
    def from_config(cls, cfg: Any) -> NetworkSpec:
        """The network a TrainConfig asks for."""
        names = ("rank", "alpha", "conv_rank", "conv_alpha")
        names += ("network_dropout", "rank_dropout", "module_dropout", "train_blocks")
        names += (*BLOCK_OPTIONS, *BLOCK_LR_OPTIONS, *TYPE_OPTIONS)
        return cls(cfg.network_target, **{name: getattr(cfg, name) for name in names})

    @property
    def conv(self) -> tuple[int, float]:
        """Rank and alpha of the 3×3 conv layers."""
        alpha = self.alpha if self.conv_alpha is None else self.conv_alpha
        return self.conv_rank or self.rank, float(alpha)

    @property
    def blockwise(self) -> bool:
        return any(getattr(self, name) is not None for name in (*BLOCK_OPTIONS, *LR_OPTIONS))

    @property
    def has_dropout(self) -> bool:
        return bool(self.network_dropout or self.rank_dropout or self.module_dropout)


# Parts of a layer that peft has wrapped (also after its adapters are deleted): the wrapper
# stands for the layer it wraps, its parts are not layers of the model.
PEFT_PARTS = {"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector", MAGNITUDE}
PEFT_PARTS |= {f"hada_{part}" for part in ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")}
PEFT_PARTS |= {f"lokr_{part}" for part in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")}


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


def unet_blocks(unet: torch.nn.Module) -> Callable[[str], int]:
    """kohya's block of each module of ``unet`` (its diffusers name): SD's by that name,
    SDXL's by the LDM name kohya gives its modules (loramill.models.unet_blocks)."""
    from loramill.models.ldm_unet import unet_pairs

    if unet.config.get("addition_embed_type") != "text_time":
        return sd_block
    ldm = {diffusers: ldm for ldm, diffusers in unet_pairs(unet.config).items()}
    return lambda name: sdxl_block(ldm[name])


def block_lrs(unet: torch.nn.Module, spec: NetworkSpec) -> list[float] | None:
    """kohya's learning-rate weight of each block of ``unet`` (None: none set)."""
    return block_lr_weights(spec, unet.config.get("addition_embed_type") == "text_time")


def module_scales(
    model: torch.nn.Module, component: str, spec: NetworkSpec
) -> dict[str, tuple[int, float]]:
    """The rank and alpha of each module the network trains on ``model``: the network's
    (kohya_conv's 3×3 convs: the conv rank and alpha), or with kohya's block-wise options its
    block's; a module whose rank or block learning-rate weight is 0 has no LoRA layers and is
    left out."""
    modules = network_modules(model, component, spec.target, spec.train_blocks)
    plain = {"rank": (spec.rank, float(spec.alpha)), "conv": spec.conv}
    if component != "unet" or not spec.blockwise:
        return {name: plain[kind] for name, kind in modules.items()}
    block_of, weights = unet_blocks(model), block_lrs(model, spec)
    lists = {  # per kind: the ranks and the alphas of the blocks
        "rank": (spec.block_dims, spec.block_alphas),
        "conv": (spec.conv_block_dims, spec.conv_block_alphas),
    }
    scales = {}
    for name, kind in modules.items():
        block = block_of(name)
        (dims, alphas), (rank, alpha) = lists[kind], plain[kind]
        if weights is None or weights[block] > 0:
            scales[name] = (
                int(dims[block]) if dims else rank,
                float(alphas[block] if alphas else alpha),
            )
    return {name: scale for name, scale in scales.items() if scale[0] > 0}


def lora_config(
    scales: dict[str, tuple[int, float]], conv: set[str], spec: NetworkSpec, init: bool | str = True
) -> Any:
    """peft's config of the network's type for the modules at ``scales`` (their rank and
    alpha); the ``conv`` modules' and every module's at other scales than the network's are
    in its patterns. LoHa and LoKr take kohya's rank and module dropout as LyCORIS does (on
    the weight's rows, in the layer); LoKr's ``full_matrix`` is peft's full factors at
    scale 1."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    plain = (spec.rank, float(spec.alpha))
    own = sorted(n for n, scale in scales.items() if n in conv or scale != plain)
    ranks, alphas = {n: scales[n][0] for n in own}, {n: scales[n][1] for n in own}
    common = {"target_modules": sorted(scales), "rank_pattern": ranks, "alpha_pattern": alphas}
    if spec.network_type in ("lora", "dora"):
        # DoRA: the plain layers, its magnitude added after (loramill.models.dora)
        return LoraConfig(r=spec.rank, lora_alpha=float(spec.alpha), init_lora_weights=init,
                          **common)  # fmt: skip
    dropouts = {"rank_dropout": spec.rank_dropout, "module_dropout": spec.module_dropout}
    if spec.network_type == "loha":
        return LoHaConfig(r=spec.rank, alpha=float(spec.alpha), init_weights=bool(init),
                          **dropouts, **common)  # fmt: skip
    if spec.full_matrix:  # every module full, at scale 1: no pattern needed
        plain, common = (FULL_MATRIX_RANK, float(FULL_MATRIX_RANK)), {**common, "rank_pattern": {}}
        common["alpha_pattern"] = {}
    return LoKrConfig(
        r=plain[0], alpha=plain[1], init_weights=bool(init), decompose_factor=spec.factor,
        decompose_both=spec.decompose_both, **dropouts, **common,
    )  # fmt: skip


def add_lora(models: dict[str, Any], spec: NetworkSpec, init: bool | str = True) -> None:
    """Freeze the base weights and add trainable LoRA layers to ``models`` (pipeline component
    name → model), the UNet first: LoRA init draws from torch's global generator."""
    for component in sorted(models, key=component_order):
        model = models[component]
        model.requires_grad_(False)
        modules = network_modules(model, component, spec.target, spec.train_blocks)
        conv = {name for name, kind in modules.items() if kind == "conv"}
        model.add_adapter(lora_config(module_scales(model, component, spec), conv, spec, init))
        if spec.network_type == "dora":
            add_dora(model)
        if spec.has_dropout and spec.network_type in ("lora", "dora"):
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


def keep_input_dtype(models: list[torch.nn.Module]) -> None:
    """Let the LoRA layers of ``models`` take their input in the dtype it comes in.

    Only for models that run under autocast: there LoRA's matmuls compute in the half dtype
    whatever the input's, so peft's cast of each half-precision input to the float32 LoRA
    weights copies every activation (and its gradient) for nothing: about a tenth of a bf16
    SD1.5 step on CPU, the same bits (bench/README.md, issue #28). Outside autocast the cast
    is needed: a half input would meet float32 weights."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for model in models:
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                module.cast_input_dtype_enabled = False
