"""Export a training checkpoint as the files users load: kohya naming and diffusers naming.

The kohya file is what A1111, ComfyUI and most model sites expect (its names: loramill.export.
kohya_naming, SDXL's in the LDM layout); the diffusers file is the checkpoint's own format
with the same metadata (loramill.export.metadata). Both are refused rather than written when
any checkpoint tensor has no place in them: consumers drop unknown keys with at most a log
line, and a silently half-loaded adapter is the failure users complain about most.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any

from loramill import LoramillError
from loramill.config import NO_DIFFUSERS_FILE
from loramill.export.metadata import kohya_metadata
from loramill.files import serialize_safetensors as serialize
from loramill.files import write_bytes
from loramill.models.adapter_parts import (
    PEFT_SUFFIXES,
    carrier,
    dora_scale,
    fold,
    parts_problem,
)
from loramill.models.checkpoint import (
    ADAPTER_METADATA_KEY,
    Checkpoint,
    config_alpha,
    has_alpha,
    module_alpha,
    module_rank,
    read_checkpoint,
)
from loramill.models.diffusers_names import diffusers_key
from loramill.models.families import DENOISERS
from loramill.models.kohya_names import TE_ROOT, KohyaNames, checkpoint_names

if TYPE_CHECKING:
    import torch

MODULE_NAME = re.compile(r"^[a-z0-9_.]+$")
# The pipeline components a checkpoint (a diffusers-format LoRA) of the SD families can hold
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# The LoraConfig fields an adapter needs to load as trained. peft's to_dict() writes every
# field of the installed release, and older releases refuse the ones they do not know
# (peft 0.20: "unexpected keyword argument 'kasa_config'").
PORTABLE_FIELDS = (
    "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
    "lora_dropout", "bias", "use_dora", "use_rslora", "fan_in_fan_out",
)  # fmt: skip
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")


def _split_key(key: str, components: Collection[str] = COMPONENTS) -> tuple[str, str, str]:
    """``unet.<module>.lora_A.weight`` -> (component, module, kohya suffix), or raise."""
    component, _, rest = key.partition(".")
    if component not in components:
        raise LoramillError(
            f"checkpoint key '{key}': unknown component '{component}' "
            f"(expected {' or '.join(components)})"
        )
    for suffix, kohya_suffix in PEFT_SUFFIXES.items():
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if MODULE_NAME.match(module):
                return component, module, kohya_suffix
    raise LoramillError(f"checkpoint key '{key}': no kohya equivalent (not a LoRA weight)")


def kohya_alpha(checkpoint: Checkpoint, component: str, module: str) -> float:
    """A module's alpha, for kohya's one ``.alpha`` per module; refuses peft options that
    scale otherwise."""
    config = checkpoint.adapter_configs.get(component)
    if not config or not has_alpha(config):
        raise LoramillError(
            f"checkpoint has '{component}' tensors but no '{component}' adapter config "
            f"in {ADAPTER_METADATA_KEY}: its alpha is unknown"
        )
    # kohya stores one alpha per module and scales by alpha / rank; rsLoRA scales by
    # alpha / sqrt(rank) and would load with the wrong strength.
    if config.get("use_rslora"):
        raise LoramillError(f"'{component}' adapter uses use_rslora: no kohya equivalent")
    return module_alpha(config, module)


def _kohya_modules(
    checkpoint: Checkpoint, names: KohyaNames
) -> dict[str, tuple[str, str, str, dict[str, torch.Tensor]]]:
    """kohya name → (component, peft module, first key, {kohya suffix: tensor})."""
    modules: dict[str, tuple[str, str, str, dict[str, torch.Tensor]]] = {}
    source: dict[str, str] = {}
    for key in sorted(checkpoint.tensors):
        component, module, suffix = _split_key(key, names.prefixes)
        try:
            name = names.module(component, module)
        except LoramillError as error:
            raise LoramillError(f"checkpoint key '{key}': {error}") from None
        target = f"{name}.{suffix}"
        # dots -> underscores is lossy; two modules must never share one kohya name.
        if target in source:
            raise LoramillError(
                f"checkpoint keys '{source[target]}' and '{key}' both map to kohya key '{target}'"
            )
        source[target] = key
        modules.setdefault(name, (component, module, key, {}))[3][suffix] = checkpoint.tensors[key]
    return modules


def to_kohya(checkpoint: Checkpoint, names: KohyaNames | None = None) -> dict[str, torch.Tensor]:
    """Rename checkpoint tensors to kohya's (LyCORIS's for LoHa, LoKr and DoRA) keys and add
    each module's ``.alpha``, its trained scale folded into a factor where the clients would
    scale it otherwise (loramill.models.adapter_parts).

    ``names``: kohya's names for the checkpoint's base model (loramill.models.kohya_names;
    by default its family's, SDXL's from its base model's UNet config).
    """
    import torch

    if not checkpoint.tensors:
        raise LoramillError("checkpoint holds no LoRA tensors")
    kind = checkpoint.network_type
    out: dict[str, torch.Tensor] = {}
    modules = _kohya_modules(checkpoint, names or checkpoint_names(checkpoint))
    for name, (component, module, key, parts) in sorted(modules.items()):
        if problem := parts_problem(kind, set(parts)):
            raise LoramillError(f"checkpoint key '{key}': its module {problem}")
        if "lora_down.weight" in parts:
            _check_pair(key, parts["lora_down.weight"], parts["lora_up.weight"])
        # float32 whatever the weights' dtype: alphas such as 0.1 are not exact in fp16.
        alpha = kohya_alpha(checkpoint, component, module)
        down = parts.get("lora_down.weight")  # a LoRA's rank is its down matrix's rows
        config = checkpoint.adapter_configs[component]
        rank = module_rank(config, module) if down is None else int(down.shape[0])
        written = _written_alpha(checkpoint, component, alpha, parts)
        factor = fold(parts, alpha / rank, written)
        if factor != 1.0:  # the module's trained scale folded into one factor
            parts[carrier(parts)] = parts[carrier(parts)] * factor
        if "dora_scale" in parts:
            parts["dora_scale"] = dora_scale(parts["dora_scale"], parts["lora_down.weight"])
        out |= {f"{name}.{suffix}": tensor for suffix, tensor in parts.items()}
        out[f"{name}.alpha"] = torch.tensor(written, dtype=torch.float32)
    return out


def _check_pair(key: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """Linear pairs are 2-D; conv pairs 4-D (lora_down has the conv's kernel, lora_up 1×1)."""
    if down.ndim != up.ndim or down.ndim not in (2, 4) or down.shape[0] != up.shape[1]:
        raise LoramillError(
            f"checkpoint key '{key}': lora_A {tuple(down.shape)} and lora_B "
            f"{tuple(up.shape)} are not a rank-r pair"
        )


def _written_alpha(
    checkpoint: Checkpoint, component: str, alpha: float, parts: dict[str, torch.Tensor]
) -> float:
    """The ``.alpha`` a module is written with. diffusers' reader of kohya files keys the
    alphas of attention projections by names its modules do not have, so each of those
    loads at the file's most common alpha: a LoRA Linear or 1×1 module whose alpha is not
    its component's (kohya's block_alphas) is written at the component's, its trained scale
    folded into lora_up, which every client then applies alike. kohya_conv's 3×3 convs keep
    their own alpha, which every client reads; so does every module of the types diffusers
    does not load (LoHa, LoKr)."""
    down = parts.get("lora_down.weight")
    if down is None or (down.ndim == 4 and tuple(down.shape[2:]) != (1, 1)):
        return alpha
    return config_alpha(checkpoint.adapter_configs[component])


def lora_pairs(
    checkpoint: Checkpoint, components: Collection[str] = COMPONENTS
) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(component, module) → {"A": lora_A, "B": lora_B} of every checkpoint module; a key of
    another component than ``components`` is refused."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in sorted(checkpoint.tensors):
        component, module, suffix = _split_key(key, components)
        parts = {PEFT_SUFFIXES[".lora_A.weight"]: "A", PEFT_SUFFIXES[".lora_B.weight"]: "B"}
        if suffix not in parts:
            raise LoramillError(f"checkpoint key '{key}': not a LoRA pair's (diffusers format)")
        pairs.setdefault((component, module), {})[parts[suffix]] = checkpoint.tensors[key]
    for (component, module), pair in pairs.items():
        if len(pair) != 2:
            missing = "lora_B" if "B" not in pair else "lora_A"
            raise LoramillError(f"'{component}.{module}': its {missing} is missing")
    return pairs


def to_diffusers(
    checkpoint: Checkpoint, components: Collection[str] = COMPONENTS
) -> tuple[dict[str, torch.Tensor], str]:
    """The diffusers-format tensors and adapter metadata (JSON) of a checkpoint.

    Keys take the one spelling diffusers and ComfyUI both map (loramill.models.diffusers_names), the
    text encoder transformers 4's ``text_model.`` path (A1111-era stacks need it, diffusers
    strips it for transformers 5). Their alphas cannot be told to both (ComfyUI reads only
    ``.alpha`` tensors, which diffusers refuses here; diffusers before 0.34 ignores the
    metadata's), so each ``lora_B`` carries its module's trained scale alpha / rank and the
    metadata says alpha = rank: every client applies the trained delta. The adapter configs
    keep only PORTABLE_FIELDS, so peft releases before the one that trained them load the file.
    ``components``: those the base model's pipeline has (Flux's: loramill.export.flux.write).
    """
    tensors = {}
    for (component, module), pair in lora_pairs(checkpoint, components).items():
        scale = kohya_alpha(checkpoint, component, module) / pair["A"].shape[0]
        # every text encoder by transformers 4's path (loramill.models.kohya_names)
        if component not in DENOISERS and not module.startswith(TE_ROOT):
            module = TE_ROOT + module
        tensors[diffusers_key(component, module, "A")] = pair["A"]
        # in float32, so a half-precision export rounds the scaled weight once
        tensors[diffusers_key(component, module, "B")] = (pair["B"].float() * scale).to(
            pair["B"].dtype
        )
    adapter_metadata = {}
    for component, config in sorted(checkpoint.adapter_configs.items()):
        # scale 1 everywhere: alpha = rank, per pattern as well
        config = {
            **config,
            "lora_alpha": config.get("r"),
            "alpha_pattern": config.get("rank_pattern") or {},
        }
        adapter_metadata |= {
            f"{component}.{field}": value
            for field, value in config.items()
            if field in PORTABLE_FIELDS
        }
    return tensors, json.dumps(adapter_metadata, indent=2, sort_keys=True)


def cast(tensors: dict[str, torch.Tensor], precision: str) -> dict[str, torch.Tensor]:
    """LoRA weights in the save precision; kohya's per-module alphas stay float32 (0.1 is not
    exact in half precision, and every loader reads them as a number)."""
    import torch

    if precision not in SAVE_PRECISIONS:
        raise LoramillError(
            f"export.save_precision '{precision}': use {' | '.join(SAVE_PRECISIONS)}"
        )
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    return {k: t if k.endswith(".alpha") else t.to(dtype) for k, t in tensors.items()}


def export_adapter(
    checkpoint_path: str | os.PathLike,
    kohya_path: str | os.PathLike,
    diffusers_path: str | os.PathLike | None,
    output_name: str,
    save_precision: str = "fp32",
    unet_config: Mapping[str, Any] | None = None,
    flux: Any = None,
    extra: Mapping[str, str] | None = None,
) -> None:
    """Write the kohya-format export of one checkpoint, and its diffusers-format one unless
    ``diffusers_path`` is None. ``unet_config``: the base model's UNet config, which SDXL's
    kohya names follow (None: read from the base model the checkpoint names); ``flux``: the
    Flux-family base model of a checkpoint trained on one (loramill.export.flux.write.FluxBase,
    which writes its kohya tensors: that module builds on this one); ``extra``: loramill
    metadata both files carry besides the checkpoint's (loramill.checkpoint)."""
    from safetensors import SafetensorError

    try:
        checkpoint = read_checkpoint(checkpoint_path)
    except (OSError, SafetensorError, json.JSONDecodeError) as error:
        raise LoramillError(f"{checkpoint_path}: cannot read checkpoint ({error})") from None
    checkpoint.metadata.update(extra or {})
    # ModelSpec's architecture of a Flux LoRA depends on the base ([dev] or [schnell])
    architecture = None if flux is None else flux.architecture
    if diffusers_path is not None and checkpoint.network_type in NO_DIFFUSERS_FILE:
        raise LoramillError(
            f"{checkpoint_path}: diffusers loads no {checkpoint.network_type} adapter; it has "
            "no diffusers-format file"
        )
    try:
        # Build both files before writing either, so a bad checkpoint leaves no output.
        if flux is None:
            kohya = to_kohya(checkpoint, checkpoint_names(checkpoint, unet_config))
        else:
            kohya = flux.kohya(checkpoint)
        kohya = cast(kohya, save_precision)
        kohya_bytes = serialize(kohya, kohya_metadata(checkpoint, kohya, output_name, architecture))
        if diffusers_path is not None:
            components = COMPONENTS if flux is None else flux.components
            diffusers_bytes = _diffusers_file(checkpoint, components, save_precision, output_name,
                                              architecture)  # fmt: skip
    except LoramillError as error:
        raise LoramillError(f"{checkpoint_path}: {error}") from None
    write_bytes(kohya_path, kohya_bytes)
    if diffusers_path is not None:
        write_bytes(diffusers_path, diffusers_bytes)


def _diffusers_file(
    checkpoint: Checkpoint,
    components: Collection[str],
    save_precision: str,
    output_name: str,
    architecture: str | None,
) -> bytes:
    """The diffusers-format file of a checkpoint: its tensors, kohya's metadata and the
    adapter configs."""
    diffusers, adapter_metadata = to_diffusers(checkpoint, components)
    diffusers = cast(diffusers, save_precision)
    metadata = kohya_metadata(checkpoint, diffusers, output_name, architecture)
    metadata["format"] = checkpoint.metadata.get("format", "pt")
    metadata[ADAPTER_METADATA_KEY] = adapter_metadata
    return serialize(diffusers, metadata)
