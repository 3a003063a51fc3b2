"""Locating and loading the base model: the embedded tiny model, a local diffusers folder,
or a Hugging Face hub id.

Weights load from safetensors only, unless the user opts in to pickle checkpoints with
``allow_unsafe_weights`` (pickle files can run code when loaded).
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.hashing import DEFAULT_DB, HashCache

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
DTYPES = ("float32", "float16", "bfloat16")


def resolve_base_model(spec: str) -> str:
    """Return a local folder path, or the hub id when ``spec`` names no local folder.

    A local path wins over a hub id of the same spelling. Errors name the ``base_model`` key.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        raise LoramillError(
            f"base_model '{spec}': a single-file checkpoint; convert it once with "
            f"`python -m loramill.single_file {spec} models/{path.stem}` and use that folder"
        )
    return resolve_model(spec, check_pipeline_folder)


def resolve_model(spec: str, check: Callable[[str, Path], None]) -> str:
    """:func:`resolve_base_model` for any kind of model folder, ``check`` judging a local one."""
    path = Path(spec).expanduser()
    if path.exists():
        check(spec, path)
        return str(path)
    # "models/sd15" with a local models/ folder is a mistyped path, not a hub id.
    looks_local = spec.startswith((".", "/", "~")) or (
        path.parent.is_dir() and path.parent != Path()
    )
    if HUB_ID.match(spec) and not looks_local:
        return spec
    raise LoramillError(f"base_model '{spec}': no such folder, and not a hub id (owner/name)")


def check_pipeline_folder(spec: str, path: Path) -> None:
    """Cheap structural check of a diffusers folder, so a broken one fails before any job."""
    index = path / "model_index.json"
    try:
        components = json.loads(index.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoramillError(
            f"base_model '{spec}': not a diffusers pipeline folder (no model_index.json)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LoramillError(f"base_model '{spec}': unreadable model_index.json ({error})") from None
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not (path / name).is_dir():
            raise LoramillError(f"base_model '{spec}': missing component folder '{name}/'")
    if not isinstance(components, dict):
        raise LoramillError(f"base_model '{spec}': model_index.json is not a JSON object")


def _load_error(spec: str, error: Exception) -> LoramillError:
    is_hub_id = not Path(spec).expanduser().exists()
    offline = is_hub_id and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
    hint = " (HF_HUB_OFFLINE is set)" if offline else ""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return LoramillError(f"base_model '{spec}': cannot load{hint}: {reason}")


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise LoramillError(f"dtype '{name}': expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_pipeline(spec: str, dtype: str = "float32", allow_unsafe_weights: bool = False) -> Any:
    """Load a StableDiffusionPipeline (no safety checker: outputs are evaluation grids)."""
    from diffusers import StableDiffusionPipeline

    source = resolve_base_model(spec)
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=torch_dtype(dtype),
            # None: prefer safetensors, fall back to pickle files (opt-in only).
            use_safetensors=None if allow_unsafe_weights else True,
            safety_checker=None,
            requires_safety_checker=False,
            local_files_only=Path(source).exists(),
        )
    except (OSError, ValueError) as error:
        raise _load_error(spec, error) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_version(pipe: Any) -> str:
    """Which Stable Diffusion the pipeline is, from its config: ``sd_v2`` (a 1024-wide text
    encoder, OpenCLIP ViT-H) with ``-v`` for v-prediction, else ``sd_v1``."""
    if pipe.unet.config.cross_attention_dim != 1024:
        return "sd_v1"
    v_prediction = pipe.scheduler.config.get("prediction_type") == "v_prediction"
    return "sd_v2-v" if v_prediction else "sd_v2"


def model_folder(spec: str) -> Path:
    """The local folder of a base model: the path itself, or a hub id's cached snapshot."""
    source = resolve_base_model(spec)
    path = Path(source)
    if path.exists():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, local_files_only=True))
    except Exception as error:  # any hub failure means: not in the local cache
        raise _load_error(spec, error) from error


def base_model_hash(spec: str, hashes: HashCache | None = None) -> str:
    """Content hash of a local base model (every file), or of a hub id's cached snapshot."""
    return component_hash(spec, "", hashes)


def component_hash(spec: str, component: str, hashes: HashCache | None = None) -> str:
    """Content hash of one component folder (``vae``, ``text_encoder`` …) of a base model."""
    path = model_folder(spec) / component if component else model_folder(spec)
    hashes = hashes or HashCache(DEFAULT_DB)
    digest = hashes.digest(path)
    hashes.save()
    return digest


# Floating-point safetensors dtypes: weights that load as float32 (integer buffers do not).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
TRAINED = ("unet", "vae", "text_encoder")


@functools.cache
def float32_bytes(spec: str) -> int:
    """Size of the base model's UNet, VAE and text encoder in float32, read from the
    safetensors headers only (a few KB each), for Snakemake's ``mem_mb``."""
    try:
        root = model_folder(spec)
    except LoramillError:
        return 0  # a hub model not downloaded yet: the job will say so
    return sum(
        map(
            safetensors_float32_bytes,
            (f for c in TRAINED for f in sorted((root / c).glob("*.safetensors"))),
        )
    )


def safetensors_float32_bytes(path: Path) -> int:
    """What a safetensors file's floating-point tensors take in float32, from its header."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return sum(
        math.prod(entry["shape"]) * 4
        for name, entry in header.items()
        if name != "__metadata__" and entry["dtype"] in FLOAT_DTYPES
    )


def job_mem_mb(spec: str, resolution: int, batch_size: int, training: bool) -> int:
    """A realistic memory request for a model job: float32 weights, plus activations.

    Calibrated on the SD1.5 architecture (bench/README.md): with 4.0 GiB of float32 weights a
    LoRA step peaked at 6.1 GiB at 512 px and 4.4 GiB (5.2 GiB in bf16) at 256 px, batch 1;
    this asks 7.0 and 5.8 GiB.
    """
    weights_mb = float32_bytes(spec) / 2**20
    per_image_mb = (1600 if training else 600) * (resolution / 512) ** 2
    return int(weights_mb * 1.25 + per_image_mb * batch_size + 500)


def use_sdpa(pipe: Any, on: bool) -> None:
    """torch's scaled_dot_product_attention in the UNet and text encoder (both libraries'
    default), or with ``on`` False the plain math attention (train.sdpa)."""
    if on:
        return
    from diffusers.models.attention_processor import AttnProcessor

    pipe.unet.set_attn_processor(AttnProcessor())
    pipe.text_encoder.set_attn_implementation("eager")
