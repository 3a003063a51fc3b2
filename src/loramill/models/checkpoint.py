"""The training checkpoint format (the network itself: loramill.models.network).

A checkpoint is a diffusers-format LoRA file: peft keys prefixed by their pipeline component
(``unet.`` or Flux's ``transformer.``, ``text_encoder.``, and SDXL's ``text_encoder_2.``) and
the adapter configs under the ``lora_adapter_metadata`` key, so ``pipe.load_lora_weights``
reads it directly and keeps alpha. Extra provenance goes under ``loramill.*`` metadata keys.
This module owns the names: a checkpoint's file name and its metadata keys are spelled here
only, and every writer and reader of checkpoints (train, export, grid, text) takes them from it.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.files import save_safetensors
from loramill.models.adapter_parts import network_type_of
from loramill.models.families import DENOISERS

ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY
# loramill's own metadata keys; exports copy every key with the prefix along.
METADATA_PREFIX = "loramill."
STEP_KEY = METADATA_PREFIX + "step"  # the optimizer step, as a decimal string
PROVENANCE_KEY = METADATA_PREFIX + "provenance"  # the training record, as JSON
# the mean training loss since the previous checkpoint, as a decimal string
TRAIN_LOSS_KEY = METADATA_PREFIX + "train_loss"
# an export's record of which checkpoint it is when not the last (export.checkpoint: best)
CHOICE_KEY = METADATA_PREFIX + "checkpoint"
# ``step-NNNNNN``: six digits at least, so names sort in step order up to a million steps.
STEP_PREFIX = "step-"
SUFFIX = ".safetensors"
STEP_NAME = re.compile(rf"^{re.escape(STEP_PREFIX)}(\d{{6,}})")
# ``ema-step-NNNNNN.safetensors``: the moving average's checkpoint of the step (train.ema)
AVERAGE_PREFIX = "ema-"
AVERAGE_KEY = METADATA_PREFIX + "ema"  # its decay, update interval and updates, as JSON


def step_name(step: int, suffix: str = SUFFIX) -> str:
    """``step-NNNNNN.safetensors``; the text stages' adapter folders, the training state and
    samples share the stem with their own ``suffix`` (``""``, ``.pt``, ``-II.png``)."""
    return f"{STEP_PREFIX}{step:06d}{suffix}"


def step_of(name: str) -> int:
    """The step a ``step_name`` spells (whatever its suffix)."""
    match = STEP_NAME.match(name)
    if match is None:
        raise LoramillError(f"{name}: not a checkpoint name ({step_name(0, '')}…)")
    return int(match.group(1))


def step_metadata(step: int, provenance: str, loss: float | None = None) -> dict[str, str]:
    """The loramill metadata of a checkpoint: its step, its JSON provenance and the mean
    training loss since the previous checkpoint."""
    metadata = {STEP_KEY: str(step), PROVENANCE_KEY: provenance}
    return metadata | ({} if loss is None else {TRAIN_LOSS_KEY: repr(loss)})


def checkpoint_steps(max_train_steps: int, save_steps: int) -> list[int]:
    """Steps at which checkpoints are written: every save_steps, and always the last step."""
    return sorted({*range(save_steps, max_train_steps + 1, save_steps), max_train_steps})


def _json_ready(config: dict[str, Any]) -> dict[str, Any]:
    # Sets iterate in hash-seed order; sorted lists keep the file bit-identical across runs.
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def _pattern(patterns: dict[str, Any] | None, module: str) -> Any:
    """The value of the first pattern that matches the end of the module's dotted name, as
    peft resolves its ``rank_pattern`` and ``alpha_pattern`` (None: no match)."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return None


def module_alpha(config: dict[str, Any], module: str) -> float:
    """A module's alpha as peft resolves it: its ``alpha_pattern`` entry, else the config's
    (kohya_conv's convs and kohya's block-wise alphas have their own)."""
    alpha = _pattern(config.get("alpha_pattern"), module)
    return config_alpha(config) if alpha is None else float(alpha)


def module_rank(config: dict[str, Any], module: str) -> int:
    """A module's rank as peft resolves it: its ``rank_pattern`` entry, else ``r``."""
    rank = _pattern(config.get("rank_pattern"), module)
    return int(config["r"] if rank is None else rank)


def has_alpha(config: dict[str, Any]) -> bool:
    """Whether an adapter config names its alpha (config_alpha's fields)."""
    return "lora_alpha" in config or "alpha" in config


def config_alpha(config: dict[str, Any]) -> float:
    """An adapter config's alpha: LoRA's (and DoRA's) ``lora_alpha``, LoHa's and LoKr's
    ``alpha``."""
    return float(config["lora_alpha"] if "lora_alpha" in config else config["alpha"])


def adapter_state(model: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LoRA tensors (contiguous CPU copies) and the JSON-ready adapter config of a model."""
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()}
    config = _json_ready(model.peft_config["default"].to_dict())
    return state, config


@dataclass
class Checkpoint:
    tensors: dict[str, Any]
    metadata: dict[str, str]
    adapter_configs: dict[str, dict[str, Any]] = field(default_factory=dict)

    def component(self, name: str) -> dict[str, Any]:
        """Tensors of one component (``unet``, ``text_encoder``…), prefix removed."""
        prefix = name + "."
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    @property
    def components(self) -> list[str]:
        """The pipeline components it holds LoRA tensors for, in the pipeline's order."""
        return sorted({key.partition(".")[0] for key in self.tensors}, key=component_order)

    @property
    def denoiser(self) -> str:
        """The denoising component it holds a LoRA for: ``unet``, or Flux's ``transformer``."""
        return next(name for name in self.components if name in DENOISERS)

    @property
    def rank(self) -> int:
        return int(self.adapter_configs[self.denoiser]["r"])

    @property
    def alpha(self) -> float:
        return config_alpha(self.adapter_configs[self.denoiser])

    @property
    def network_type(self) -> str:
        """train.network_type of the network it holds, told by its tensors' names."""
        return network_type_of(self.tensors)


def component_order(name: str) -> tuple[int, str]:
    """The denoiser (UNet or transformer) first, then the text encoders by name
    (``text_encoder``, ``text_encoder_2``)."""
    return (name not in DENOISERS, name)


def network_state(models: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The LoRA tensors of the trained components (``models``: pipeline component name →
    model), prefixed by component name, and their adapter configs, as a checkpoint stores
    them."""
    tensors: dict[str, Any] = {}
    adapter_metadata: dict[str, Any] = {}
    for name in sorted(models, key=component_order):
        state, config = adapter_state(models[name])
        tensors.update({f"{name}.{k}": v for k, v in state.items()})
        adapter_metadata.update({f"{name}.{k}": v for k, v in config.items()})
    return tensors, adapter_metadata


def write_checkpoint(
    path: str | os.PathLike,
    tensors: dict[str, Any],
    adapter_metadata: dict[str, Any],
    metadata: dict[str, str],
) -> None:
    header = {
        "format": "pt",
        ADAPTER_METADATA_KEY: json.dumps(adapter_metadata, indent=2, sort_keys=True),
        **metadata,
    }
    save_safetensors(tensors, path, header)


def save_checkpoint(
    path: str | os.PathLike, models: dict[str, Any], metadata: dict[str, str]
) -> None:
    write_checkpoint(path, *network_state(models), metadata)


def load_network_state(models: dict[str, Any], tensors: dict[str, Any]) -> None:
    """Put saved LoRA tensors (``network_state`` keys) into the models' LoRA layers, exactly.

    Every tensor must find its layer and every layer its tensor: a partial load would train
    from a silently different start.
    """
    from peft.utils import set_peft_model_state_dict

    checkpoint = Checkpoint(tensors=tensors, metadata={})
    for name in checkpoint.components:
        if name not in models:
            part = checkpoint.component(name)
            raise LoramillError(f"{len(part)} {name} LoRA tensors but no {name} to train")
    for name, model in models.items():
        part = checkpoint.component(name)
        expected = set(adapter_state(model)[0])
        if set(part) != expected:
            extra, missing = sorted(set(part) - expected), sorted(expected - set(part))
            first = (extra or missing)[0]
            raise LoramillError(
                f"{name}: {len(extra)} LoRA tensors have no layer and {len(missing)} layers "
                f"have no tensor (first: {first})"
            )
        set_peft_model_state_dict(model, part)


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    packed = json.loads(metadata.get(ADAPTER_METADATA_KEY, "{}"))
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        component, _, option = key.partition(".")
        configs.setdefault(component, {})[option] = value
    return Checkpoint(tensors=tensors, metadata=metadata, adapter_configs=configs)


def list_checkpoints(checkpoints_dir: str | os.PathLike, average: bool = False) -> list[Path]:
    """Checkpoint files of a training run, in step order; ``average``: the moving average's
    (train.ema) instead."""
    pattern = f"{AVERAGE_PREFIX if average else ''}{STEP_PREFIX}*{SUFFIX}"
    paths = sorted(Path(checkpoints_dir).glob(pattern))
    if not paths:
        what = "moving-average checkpoints (train.ema)" if average else "checkpoints"
        raise LoramillError(f"{checkpoints_dir}: no {what} ({pattern})")
    return paths
