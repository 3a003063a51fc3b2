"""The metadata of an exported file: kohya sd-scripts' ``ss_*`` training fields and its
``sshs_*`` hashes, ModelSpec's ``modelspec.*`` labels, and loramill's own keys, as model sites,
metadata viewers and AUTOMATIC1111 read them."""

from __future__ import annotations

import datetime
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramill import LoramillError
from loramill.files import serialize_safetensors as serialize
from loramill.hashing import LEGACY_LENGTH, LEGACY_OFFSET, legacy_hash
from loramill.models.checkpoint import (
    ADAPTER_METADATA_KEY,
    METADATA_PREFIX,
    PROVENANCE_KEY,
    STEP_KEY,
    Checkpoint,
    config_alpha,
    has_alpha,
)
from loramill.models.families import DENOISERS
from loramill.models.kohya_names import KOHYA_KEY_PREFIXES
from loramill.models.unet_blocks import BLOCK_OPTIONS, LR_OPTIONS

if TYPE_CHECKING:
    import torch

MODELSPEC = {
    "modelspec.sai_model_spec": "1.0.0",
    "modelspec.implementation": "https://github.com/huggingface/diffusers",
}
# The base the adapter was trained on (its family's ``version``: loramill.models.sd, .sdxl) as
# kohya and ModelSpec name it: ss_base_model_version, ss_v2, modelspec.architecture.
BASE_LABELS = {
    "sd_v1": ("sd_v1", "False", "stable-diffusion-v1/lora"),
    "sd_v2": ("sd_v2", "True", "stable-diffusion-v2-512/lora"),
    "sd_v2-v": ("sd_v2", "True", "stable-diffusion-v2-768-v/lora"),
    "sdxl": ("sdxl_base_v1-0", "False", "stable-diffusion-xl-v1-base/lora"),
}
# ModelSpec's implementation of a file: the code whose module names its keys use. kohya's SDXL
# names are the original (Stability AI) UNet's, so kohya writes this for SDXL LoRAs.
SGM_IMPLEMENTATION = "https://github.com/Stability-AI/generative-models"
# A Flux-family base (its family's ``version``: loramill.models.flux.family) → ModelSpec's
# implementation of kohya's Flux LoRA, whose names are BFL's (kohya's sai_model_spec.py
# IMPL_FLUX, IMPL_CHROMA). ModelSpec's architecture comes from the base model itself
# (flux-1-dev/lora or flux-1-schnell/lora; chroma/lora): its version does not tell [dev] apart.
FLUX_IMPLEMENTATIONS = {
    "flux1": "https://github.com/black-forest-labs/flux",
    "chroma": "https://huggingface.co/lodestones/Chroma",
}
FLUX_NETWORK_MODULE = "networks.lora_flux"  # kohya's ss_network_module of a Flux LoRA
# The flow-matching options kohya's flux_train_network.py records (update_metadata), as ss_<name>
FLUX_TRAINING = (
    "timestep_sampling", "discrete_flow_shift", "sigmoid_scale", "model_prediction_type",
    "guidance_scale",
)  # fmt: skip


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


# The types LyCORIS trains (kohya's --network_module lycoris.kohya), by its algo names
LYCORIS_MODULE = "lycoris.kohya"
ALGOS = {"loha": "loha", "lokr": "lokr", "dora": "lora"}
# LoRA+'s ratios, network arguments in kohya's networks/lora.py
LORAPLUS = ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")


def _network_args(train_config: dict[str, Any]) -> str | None:
    """kohya's ss_network_args: the network options beyond dim and alpha, as JSON strings."""
    args = {}
    kind = train_config.get("network_type", "lora")
    if kind in ALGOS:  # LyCORIS's network module: its algorithm and options
        args["algo"] = ALGOS[kind]
        lokr = {"factor": -1, "decompose_both": False, "full_matrix": False}
        if kind == "dora":  # LyCORIS's weight decomposition, per input column (models.dora)
            args |= {"dora_wd": "True", "wd_on_output": "False"}
        if kind == "lokr":
            args |= {
                k: str(train_config[k]) for k, v in lokr.items() if train_config.get(k, v) != v
            }
    if train_config.get("network_target") == "kohya_conv":  # LoCon: conv rank and alpha
        conv_alpha = train_config.get("conv_alpha")
        args["conv_dim"] = str(train_config.get("conv_rank") or train_config.get("rank"))
        args["conv_alpha"] = str(
            conv_alpha if conv_alpha is not None else train_config.get("alpha")
        )
    for name in ("rank_dropout", "module_dropout", *LORAPLUS):
        if train_config.get(name):
            args[name] = str(train_config[name])
    for name in (*BLOCK_OPTIONS, *LR_OPTIONS):  # as kohya's command line takes them
        value = train_config.get(name)
        if value is not None:  # a list comma-separated, a preset's name as it is
            args[name] = value if isinstance(value, str) else ",".join(f"{v:g}" for v in value)
    if train_config.get("block_lr_zero_threshold"):
        args["block_lr_zero_threshold"] = str(train_config["block_lr_zero_threshold"])
    if train_config.get("train_blocks", "all") != "all":  # lora_flux's network argument
        args["train_blocks"] = str(train_config["train_blocks"])
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


def _base_labels(
    provenance: dict[str, Any], tensors: Mapping[str, Any], architecture: str | None = None
) -> dict[str, str]:
    """What the adapter was trained on, as kohya and ModelSpec label it, and the code whose
    module names the file's keys use. ``architecture``: ModelSpec's, for a Flux-family base."""
    # Checkpoints from before the label was recorded were all trained on SD1 bases.
    base = provenance.get("base_version", "sd_v1")
    kohya_file = all(key.startswith(KOHYA_KEY_PREFIXES) for key in tensors)
    if base in FLUX_IMPLEMENTATIONS:
        return _flux_labels(provenance, base, architecture, kohya_file)
    if base not in BASE_LABELS:
        raise LoramillError(f"provenance base_version '{base}': no kohya label for it")
    version, v2, architecture = BASE_LABELS[base]
    labels = {"ss_base_model_version": version, "ss_v2": v2, "modelspec.architecture": architecture}
    if base == "sdxl" and kohya_file:
        labels["modelspec.implementation"] = SGM_IMPLEMENTATION
    return labels


def _flux_labels(
    provenance: dict[str, Any], base: str, architecture: str | None, kohya_file: bool
) -> dict[str, str]:
    """kohya's labels of a Flux-family LoRA (flux_train_network.py): its network module,
    the base's version and family, the flow-matching options it was trained with."""
    if architecture is None:
        raise LoramillError(
            f"base_version '{base}': a Flux LoRA's architecture is read from its base model"
        )
    train_config = provenance.get("train_config") or {}
    labels = {
        "ss_network_module": FLUX_NETWORK_MODULE,
        "ss_base_model_version": base,
        "ss_v2": "False",
        "ss_model_type": str(provenance.get("family", base)),
        "modelspec.architecture": architecture,
    }
    labels |= {
        f"ss_{name}": str(train_config[name])
        for name in FLUX_TRAINING
        if train_config.get(name) is not None
    }
    masked = train_config.get("apply_t5_attn_mask")  # None: the family's (Chroma always masks)
    labels["ss_apply_t5_attn_mask"] = str(base == "chroma" if masked is None else masked)
    if kohya_file:
        labels["modelspec.implementation"] = FLUX_IMPLEMENTATIONS[base]
    return labels


def kohya_metadata(
    checkpoint: Checkpoint,
    tensors: Mapping[str, torch.Tensor],
    output_name: str,
    architecture: str | None = None,
) -> dict[str, str]:
    """String metadata for an exported file holding ``tensors``; ``architecture``: ModelSpec's
    architecture of a LoRA on a Flux-family base (the family's ``architecture``).

    Values are written the way kohya sd-scripts writes them (``str()`` of its Python
    values) so metadata viewers and model sites parse them. The one time-dependent value is
    ``modelspec.date`` (see creation_date).
    """
    provenance = _provenance(checkpoint)
    # kohya has one dim/alpha per file; the denoiser's is the one users set (the TE's match).
    configs = checkpoint.adapter_configs
    config = next(
        (configs[c] for c in (*DENOISERS, "text_encoder", "text_encoder_2") if configs.get(c)),
        None,
    )
    if not config or "r" not in config or not has_alpha(config):
        raise LoramillError(
            f"checkpoint has no adapter config (r, lora_alpha) in {ADAPTER_METADATA_KEY}"
        )
    train_config = provenance.get("train_config") or {}
    if train_config.get("full_matrix"):  # trained at peft's full-matrix rank (models.network)
        config = {"r": train_config["rank"], "lora_alpha": train_config["alpha"]}
    resolution = provenance.get("resolution")
    optional = _training_fields(provenance, checkpoint.metadata.get(STEP_KEY))
    metadata = {
        "ss_output_name": output_name,
        "ss_network_module": LYCORIS_MODULE
        if train_config.get("network_type") in ALGOS
        else "networks.lora",
        "ss_network_dim": str(int(config["r"])),
        "ss_network_alpha": str(config_alpha(config)),
        # kohya groups tag counts by dataset folder: {folder: {tag: count}}.
        "ss_tag_frequency": json.dumps(
            {str(provenance.get("dataset", output_name)): provenance.get("tag_frequency", {})},
            sort_keys=True,
        ),
        **{k: str(v) for k, v in optional.items() if v is not None},
        **MODELSPEC,
        **_base_labels(provenance, tensors, architecture),
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
