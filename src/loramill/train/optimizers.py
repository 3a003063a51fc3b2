"""The optimizer and learning-rate schedule of a run (kohya's option names).

``optimizer_type``: AdamW (torch), AdamW8bit (bitsandbytes, CUDA only), Lion (lion-pytorch),
Prodigy (prodigyopt), Adafactor (transformers, with the learning rate given, not relative).
``optimizer_args`` go to the optimizer as keyword arguments (``weight_decay``, ``betas``,
``eps``, Prodigy's ``d_coef`` …); lists become tuples. Parameter groups: the UNet's LoRA
layers at ``unet_lr`` (default ``learning_rate``), the text encoder's at ``text_encoder_lr``;
with LoRA+ (``loraplus_lr_ratio``) each component's up matrices in a group of their own.
``lr_scheduler`` is any of diffusers' schedules; ``cosine_with_restarts`` takes
``lr_scheduler_num_cycles``, ``polynomial`` ``lr_scheduler_power``.
"""

from __future__ import annotations

import importlib
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


def param_groups(
    models: dict[str, Any], rates: dict[str, float], ratios: dict[str, float | None]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The optimizer's parameter groups and their names: each component's trained parameters
    at its rate (``rates``, by component name). Where the component has a LoRA+ ratio, its
    up matrices (peft's ``lora_B``, kohya's ``lora_up``) get a group of their own, named
    ``<component>_plus``, at ratio × rate, after the rest, as kohya's networks/lora.py
    orders them (an optimizer state saved before names no group, so the names live here)."""
    groups, names = [], []
    for name, model in models.items():
        trained = [(key, p) for key, p in model.named_parameters() if p.requires_grad]
        ratio = ratios.get(name)
        up = [p for key, p in trained if ratio and ".lora_B." in key]
        ids = {id(p) for p in up}
        groups.append({"params": [p for _, p in trained if id(p) not in ids], "lr": rates[name]})
        names.append(name)
        if up:
            groups.append({"params": up, "lr": rates[name] * ratio})
            names.append(f"{name}_plus")
    return groups, names


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
