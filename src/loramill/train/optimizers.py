"""The optimizer and learning-rate schedule of a run (kohya's option names).

``optimizer_type``: AdamW (torch), AdamW8bit (bitsandbytes, CUDA only), Lion (lion-pytorch),
Prodigy (prodigyopt), Adafactor (transformers, with the learning rate given, not relative).
``optimizer_args`` go to the optimizer as keyword arguments (``weight_decay``, ``betas``,
``eps``, Prodigy's ``d_coef`` …); lists become tuples. Parameter groups: the UNet's LoRA
layers at ``unet_lr`` (default ``learning_rate``), the text encoder's at ``text_encoder_lr``;
with kohya's block learning rates (``down_lr_weight`` …) a group per UNet block; with LoRA+
(``loraplus_lr_ratio``) each group's up matrices in a group of their own.
``lr_scheduler`` is any of diffusers' schedules; ``cosine_with_restarts`` takes
``lr_scheduler_num_cycles``, ``polynomial`` ``lr_scheduler_power``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import Any

from loramill import LoramillError

# optimizer_type → (module, class, the pip package that provides it)
OPTIMIZERS = {
    "AdamW": ("torch.optim", "AdamW", "torch"),
    "AdamW8bit": ("bitsandbytes.optim", "AdamW8bit", "bitsandbytes"),
    "Lion": ("lion_pytorch", "Lion", "lion-pytorch"),
    "Prodigy": ("prodigyopt", "Prodigy", "prodigyopt"),
    "Adafactor": ("transformers.optimization", "Adafactor", "transformers"),
}
# Adafactor computes its own step size unless told not to; a configured learning rate wins.
FIXED_STEP = {"Adafactor": {"scale_parameter": False, "relative_step": False, "warmup_init": False}}


def check_optimizer(cfg: Any) -> None:
    """What can be checked without importing anything (the config is checked at parse)."""
    if cfg.optimizer_type not in OPTIMIZERS:
        choices = " | ".join(OPTIMIZERS)
        raise LoramillError(f"train.optimizer_type '{cfg.optimizer_type}': use {choices}")
    if not isinstance(cfg.optimizer_args, dict):
        raise LoramillError("train.optimizer_args: expected a mapping such as {weight_decay: 0.01}")


# where a trained parameter's module name ends: peft's LoRA (and DoRA's magnitude), LoHa, LoKr
ADAPTER_PART = re.compile(r"\.(?:lora_|hada_|lokr_)")


def param_groups(
    models: dict[str, Any],
    rates: dict[str, float],
    ratios: dict[str, float | None],
    blocks: dict[str, tuple[Callable[[str], int], list[float]]] | None = None,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The optimizer's parameter groups and their names: each component's trained parameters
    at its rate (``rates``, by component name). With kohya's block learning rates
    (``blocks``: a component's block of each module, and each block's weight) a group per
    block, ``<component>_block<N>``, at weight × rate. Where the component has a LoRA+ ratio,
    each group's up matrices (peft's ``lora_B``, kohya's ``lora_up``) get one of their own,
    ``…_plus``, at ratio × its rate, after the rest, as kohya's networks/lora.py orders them
    (an optimizer state saved before names no group, so the names live here)."""
    groups: list[dict[str, Any]] = []
    names: list[str] = []
    for name, model in models.items():
        trained = [(key, p) for key, p in model.named_parameters() if p.requires_grad]
        parts: dict[str, tuple[list[tuple[str, Any]], float]] = {name: (trained, 1.0)}
        if blocks and name in blocks:
            block_of, weights = blocks[name]
            parts = {}
            for key, param in trained:
                block = block_of(ADAPTER_PART.split(key)[0])
                parts.setdefault(f"{name}_block{block}", ([], weights[block]))[0].append(
                    (key, param)
                )
        for part, (params, weight) in parts.items():
            _add_group(groups, names, part, params, rates[name] * weight, ratios.get(name))
    return groups, names


def _add_group(
    groups: list[dict[str, Any]], names: list[str], name: str,
    params: list[tuple[str, Any]], lr: float, ratio: float | None,
) -> None:  # fmt: skip
    up = [p for key, p in params if ratio and ".lora_B." in key]
    ids = {id(p) for p in up}
    groups.append({"params": [p for _, p in params if id(p) not in ids], "lr": lr})
    names.append(name)
    if up:
        groups.append({"params": up, "lr": lr * ratio})
        names.append(f"{name}_plus")


def make_optimizer(cfg: Any, groups: list[dict[str, Any]]) -> Any:
    module_name, class_name, package = OPTIMIZERS[cfg.optimizer_type]
    try:
        optimizer_class = getattr(importlib.import_module(module_name), class_name)
    except ImportError:
        raise LoramillError(
            f"train.optimizer_type {cfg.optimizer_type}: needs the {package} package "
            f"(pip install {package})"
        ) from None
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.optimizer_args.items()}
    try:
        return optimizer_class(groups, **{**FIXED_STEP.get(cfg.optimizer_type, {}), **args})
    except (TypeError, ValueError) as error:
        raise LoramillError(f"train.optimizer_args for {cfg.optimizer_type}: {error}") from None


def make_scheduler(cfg: Any, optimizer: Any, processes: int) -> Any:
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps * processes,
        num_training_steps=cfg.max_train_steps * processes,
        num_cycles=cfg.lr_scheduler_num_cycles,
        power=cfg.lr_scheduler_power,
    )
