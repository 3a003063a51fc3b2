"""Export a training checkpoint as the files users load: kohya naming and diffusers naming.

The kohya file is what A1111, ComfyUI and most model sites expect; the diffusers file is the
checkpoint's own format with the same metadata. Both are refused rather than written when any
checkpoint tensor has no place in them: consumers drop unknown keys with at most a log line,
and a silently half-loaded adapter is the failure users complain about most.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramill import LoramillError
from loramill.files import serialize_safetensors as serialize
from loramill.files import write_bytes
from loramill.hashing import LEGACY_LENGTH, LEGACY_OFFSET, legacy_hash
from loramill.models.checkpoint import (
    ADAPTER_METADATA_KEY,
    METADATA_PREFIX,
    PROVENANCE_KEY,
    STEP_KEY,
    Checkpoint,
    module_alpha,
    read_checkpoint,
)
from loramill.models.diffusers_names import diffusers_key
from loramill.models.kohya_names import KOHYA_PREFIXES, PEFT_SUFFIXES, TE_ROOT, kohya_module

if TYPE_CHECKING:
    import torch

MODULE_NAME = re.compile(r"^[a-z0-9_.]+$")
MODELSPEC = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.implementation": "https://github.com/huggingface/diffusers",
}
# The base the adapter was trained on (loramill.models.base_model.base_version) as kohya and the
# ModelSpec name it: ss_base_model_version, ss_v2, modelspec.architecture.
BASE_LABELS = {
    "sd_v1": ("sd_v1", "False", "stable-diffusion-v1/lora"),
    "sd_v2": ("sd_v2", "True", "stable-diffusion-v2-512/lora"),
    "sd_v2-v": ("sd_v2", "True", "stable-diffusion-v2-768-v/lora"),
}
# The LoraConfig fields an adapter needs to load as trained. peft's to_dict() writes every
# field of the installed release, and older releases refuse the ones they do not know
# (peft 0.20: "unexpected keyword argument 'kasa_config'").
PORTABLE_FIELDS = (
    "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
    "lora_dropout", "bias", "use_dora", "use_rslora", "fan_in_fan_out",
)  # fmt: skip
SAVE_PRECISIONS = ("fp32", "fp16", "bf16")


def _split_key(key: str) -> tuple[str, str, str]:
    """``unet.<module>.lora_A.weight`` -> (component, module, kohya suffix), or raise."""
    component, _, rest = key.partition(".")
    if component not in KOHYA_PREFIXES:
        raise LoramillError(
            f"checkpoint key '{key}': unknown component '{component}' "
            f"(expected {' or '.join(KOHYA_PREFIXES)})"
        )
    for suffix, kohya_suffix in PEFT_SUFFIXES.items():
        if rest.endswith(suffix):
            module = rest[: -len(suffix)]
            if MODULE_NAME.match(module):
                return component, module, kohya_suffix
    raise LoramillError(
        f"checkpoint key '{key}': no kohya equivalent (not a plain LoRA A/B weight)"
    )


def _module_alpha(checkpoint: Checkpoint, component: str, module: str) -> float:
    config = checkpoint.adapter_configs.get(component)
    if not config or "lora_alpha" not in config:
        raise LoramillError(
            f"checkpoint has '{component}' tensors but no '{component}' adapter config "
            f"in {ADAPTER_METADATA_KEY}: its alpha is unknown"
        )
    # kohya stores one alpha per module and scales by alpha / rank; these peft options
    # scale differently and would load with the wrong strength.
    for option in ("use_dora", "use_rslora"):
        if config.get(option):
            raise LoramillError(f"'{component}' adapter uses {option}: no kohya equivalent")
    return module_alpha(config, module)


def to_kohya(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Rename checkpoint tensors to kohya keys and add each module's true ``.alpha``."""
    import torch

    if not checkpoint.tensors:
        raise LoramillError("checkpoint holds no LoRA tensors")
    out: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}
    modules: dict[str, tuple[str, str, str]] = {}
    for key in sorted(checkpoint.tensors):
        component, module, suffix = _split_key(key)
        name = kohya_module(component, module)
        target = f"{name}.{suffix}"
        # dots -> underscores is lossy; two modules must never share one kohya name.
        if target in out:
            raise LoramillError(
                f"checkpoint keys '{source[target]}' and '{key}' both map to kohya key '{target}'"
            )
        out[target] = checkpoint.tensors[key]
        source[target] = key
        modules[name] = (component, module, key)

    for name, (component, module, key) in sorted(modules.items()):
        down, up = out.get(f"{name}.lora_down.weight"), out.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            missing = "lora_B" if up is None else "lora_A"
            raise LoramillError(f"checkpoint key '{key}': its {missing} partner is missing")
        # Linear pairs are 2-D; conv pairs 4-D (lora_down has the conv's kernel, lora_up 1×1).
        if down.ndim != up.ndim or down.ndim not in (2, 4) or down.shape[0] != up.shape[1]:
            raise LoramillError(
                f"checkpoint key '{key}': lora_A {tuple(down.shape)} and lora_B "
                f"{tuple(up.shape)} are not a rank-r pair"
            )
        # float32 whatever the weights' dtype: alphas such as 0.1 are not exact in fp16.
        alpha = _module_alpha(checkpoint, component, module)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return out


def _pairs(checkpoint: Checkpoint) -> dict[tuple[str, str], dict[str, torch.Tensor]]:
    """(component, module) → {"A": lora_A, "B": lora_B} of every checkpoint module."""
    pairs: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key in sorted(checkpoint.tensors):
        component, module, suffix = _split_key(key)
        part = "A" if suffix == PEFT_SUFFIXES[".lora_A.weight"] else "B"
        pairs.setdefault((component, module), {})[part] = checkpoint.tensors[key]
    for (component, module), pair in pairs.items():
        if len(pair) != 2:
            missing = "lora_B" if "B" not in pair else "lora_A"
            raise LoramillError(f"'{component}.{module}': its {missing} is missing")
    return pairs


def to_diffusers(checkpoint: Checkpoint) -> tuple[dict[str, torch.Tensor], str]:
    """The diffusers-format tensors and adapter metadata (JSON) of a checkpoint.

    Keys take the one spelling diffusers and ComfyUI both map (loramill.models.diffusers_names), the
    text encoder transformers 4's ``text_model.`` path (A1111-era stacks need it, diffusers
    strips it for transformers 5). Their alphas cannot be told to both (ComfyUI reads only
    ``.alpha`` tensors, which diffusers refuses here; diffusers before 0.34 ignores the
    metadata's), so each ``lora_B`` carries its module's trained scale alpha / rank and the
    metadata says alpha = rank: every client applies the trained delta. The adapter configs
    keep only PORTABLE_FIELDS, so peft releases before the one that trained them load the file.
    """
    tensors = {}
    for (component, module), pair in _pairs(checkpoint).items():
        scale = _module_alpha(checkpoint, component, module) / pair["A"].shape[0]
        if component == "text_encoder" and not module.startswith(TE_ROOT):
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


def _provenance(checkpoint: Checkpoint) -> dict[str, Any]:
    raw = checkpoint.metadata.get(PROVENANCE_KEY)
    if raw is None:
        raise LoramillError(f"checkpoint has no '{PROVENANCE_KEY}' metadata")
    try:
        provenance = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoramillError(f"'{PROVENANCE_KEY}' metadata is not JSON ({error.msg})") from None
    if not isinstance(provenance, dict):
        raise LoramillError(f"'{PROVENANCE_KEY}' metadata is not a JSON object")
    return provenance


def _epoch(provenance: dict[str, Any], step: str | None) -> int | None:
    """The epoch a step falls in (kohya's ss_epoch), from the batches an epoch has."""
    per_epoch = provenance.get("batches_per_epoch")
    if not per_epoch or step is None:
        return None
    accumulation = provenance.get("train_config", {}).get("gradient_accumulation_steps", 1)
    return -(-int(step) * accumulation // per_epoch)


def _network_args(train_config: dict[str, Any]) -> str | None:
    """kohya's ss_network_args: the network options beyond dim and alpha, as JSON strings."""
    args = {}
    if train_config.get("network_target") == "kohya_conv":  # LoCon: conv rank and alpha
        conv_alpha = train_config.get("conv_alpha")
        args["conv_dim"] = str(train_config.get("conv_rank") or train_config.get("rank"))
        args["conv_alpha"] = str(
            conv_alpha if conv_alpha is not None else train_config.get("alpha")
        )
    for name in ("rank_dropout", "module_dropout"):
        if train_config.get(name):
            args[name] = str(train_config[name])
    return json.dumps(args, sort_keys=True) if args else None


def _model_name(base_model: str) -> str | None:
    # kohya's rule: a local path is recorded by its last component, a hub id as given.
    path = Path(base_model)
    return (path.name if path.exists() else base_model) or None


def data_hash(serialized: bytes) -> str:
    """sha256 of a safetensors file's tensor data (everything after the header).

    A1111 and kohya's ``sshs_model_hash``: editing metadata does not change it.
    """
    header_length = int.from_bytes(serialized[:8], "little")
    return hashlib.sha256(serialized[8 + header_length :]).hexdigest()


def safetensors_hashes(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[str, str]:
    """(``sshs_model_hash``, ``sshs_legacy_hash``) as kohya sd-scripts precomputes them.

    Both are taken from the file serialized with only the ``ss_*`` metadata, so later edits
    of other metadata keep them stable.
    """
    training = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    # Canonical header: the legacy hash reads bytes that can include the header.
    serialized = serialize(dict(tensors), training)
    return data_hash(serialized), legacy_hash(
        serialized[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_LENGTH]
    )


def creation_date() -> str:
    """``modelspec.date``: the UTC day the file is written, or the day of ``SOURCE_DATE_EPOCH``.

    A date, not a time, and only in the header: tensors and hashes never see it, and two exports
    on one day are byte-identical. SOURCE_DATE_EPOCH (the reproducible-builds convention)
    pins it, so a rebuild matches a published file byte for byte.
    """
    raw = os.environ.get("SOURCE_DATE_EPOCH")
    if raw is None:
        moment = datetime.datetime.now(datetime.UTC)
    else:
        try:
            moment = datetime.datetime.fromtimestamp(int(raw), datetime.UTC)
        except (ValueError, OverflowError, OSError):
            raise LoramillError(
                f"SOURCE_DATE_EPOCH={raw!r} is not a count of seconds since 1970"
            ) from None
    return moment.date().isoformat()


def _training_fields(provenance: dict[str, Any], step: str | None) -> dict[str, Any]:
    """kohya's ss_* fields that a checkpoint may lack (None: left out)."""
    train_config = provenance.get("train_config") or {}
    source = provenance.get("base_model_file") or {}
    resolution = provenance.get("resolution")
    return {
        "ss_seed": provenance.get("seed"),
        "ss_num_train_images": provenance.get("num_images"),
        "ss_max_train_steps": train_config.get("max_train_steps"),
        "ss_learning_rate": train_config.get("learning_rate"),
        "ss_resolution": None if resolution is None else (resolution, resolution),
        "ss_sd_model_name": source.get("file") or _model_name(provenance.get("base_model", "")),
        # AUTOMATIC1111's hashes exist for single-file checkpoints only (models.single_file)
        "ss_sd_model_hash": source.get("model_hash"),
        "ss_new_sd_model_hash": source.get("sha256"),
        "ss_steps": step,
        "ss_epoch": _epoch(provenance, step),
        "ss_max_train_epochs": train_config.get("max_train_epochs"),
        "ss_unet_lr": train_config.get("unet_lr") or train_config.get("learning_rate"),
        "ss_text_encoder_lr": train_config.get("text_encoder_lr"),
        "ss_network_dropout": train_config.get("network_dropout") or None,
        "ss_network_args": _network_args(train_config),
    }


def kohya_metadata(
    checkpoint: Checkpoint, tensors: Mapping[str, torch.Tensor], output_name: str
) -> dict[str, str]:
    """String metadata for an exported file holding ``tensors``.

    Values are written the way kohya sd-scripts writes them (``str()`` of its Python
    values) so metadata viewers and model sites parse them. The one time-dependent value is
    ``modelspec.date`` (see creation_date).
    """
    provenance = _provenance(checkpoint)
    # kohya has one dim/alpha per file; the UNet's is the one users set (and the TE's match).
    configs = checkpoint.adapter_configs
    config = configs.get("unet") or configs.get("text_encoder")
    if not config or "r" not in config or "lora_alpha" not in config:
        raise LoramillError(
            f"checkpoint has no adapter config (r, lora_alpha) in {ADAPTER_METADATA_KEY}"
        )
    resolution = provenance.get("resolution")
    optional = _training_fields(provenance, checkpoint.metadata.get(STEP_KEY))
    # Checkpoints from before the label was recorded were all trained on SD1 bases.
    version, v2, architecture = BASE_LABELS[provenance.get("base_version", "sd_v1")]
    metadata = {
        "ss_output_name": output_name,
        "ss_base_model_version": version,
        "ss_v2": v2,
        "modelspec.architecture": architecture,
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(int(config["r"])),
        "ss_network_alpha": str(float(config["lora_alpha"])),
        # kohya groups tag counts by dataset folder: {folder: {tag: count}}.
        "ss_tag_frequency": json.dumps(
            {str(provenance.get("dataset", output_name)): provenance.get("tag_frequency", {})},
            sort_keys=True,
        ),
        **{k: str(v) for k, v in optional.items() if v is not None},
        **MODELSPEC,
        "modelspec.title": output_name,
        "modelspec.date": creation_date(),
    }
    if resolution is not None:
        metadata["modelspec.resolution"] = f"{resolution}x{resolution}"
    if provenance.get("trigger"):
        metadata["modelspec.trigger_phrase"] = str(provenance["trigger"])
    metadata.update({k: v for k, v in checkpoint.metadata.items() if k.startswith(METADATA_PREFIX)})
    model_hash, legacy_hash = safetensors_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    return metadata


def export_adapter(
    checkpoint_path: str | os.PathLike,
    kohya_path: str | os.PathLike,
    diffusers_path: str | os.PathLike | None,
    output_name: str,
    save_precision: str = "fp32",
) -> None:
    """Write the kohya-format export of one checkpoint, and its diffusers-format one unless
    ``diffusers_path`` is None."""
    from safetensors import SafetensorError

    try:
        checkpoint = read_checkpoint(checkpoint_path)
    except (OSError, SafetensorError, json.JSONDecodeError) as error:
        raise LoramillError(f"{checkpoint_path}: cannot read checkpoint ({error})") from None
    try:
        # Build both files before writing either, so a bad checkpoint leaves no output.
        kohya = cast(to_kohya(checkpoint), save_precision)
        kohya_bytes = serialize(kohya, kohya_metadata(checkpoint, kohya, output_name))
        diffusers, adapter_metadata = to_diffusers(checkpoint)
        diffusers = cast(diffusers, save_precision)
        diffusers_meta = kohya_metadata(checkpoint, diffusers, output_name)
    except LoramillError as error:
        raise LoramillError(f"{checkpoint_path}: {error}") from None
    diffusers_meta["format"] = checkpoint.metadata.get("format", "pt")
    diffusers_meta[ADAPTER_METADATA_KEY] = adapter_metadata
    write_bytes(kohya_path, kohya_bytes)
    if diffusers_path is not None:
        write_bytes(diffusers_path, serialize(diffusers, diffusers_meta))
