"""Locating and loading the base model: the embedded tiny model, a local diffusers folder,
or a Hugging Face hub id.

Weights load from safetensors only, unless the user opts in to pickle checkpoints with
``allow_unsafe_weights`` (pickle files can run code when loaded).
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Collection
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.model_files import load_error, resolve_base_model
from loramill.models.families import family_code, image_family, unet_family
from loramill.models.flux.detect import transformer_family

DTYPES = ("float32", "float16", "bfloat16")


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise LoramillError(f"dtype '{name}': expected one of {', '.join(DTYPES)}")
    return getattr(torch, name)


def load_pipeline(
    spec: str,
    dtype: str | dict[str, str] = "float32",
    allow_unsafe_weights: bool = False,
    family: str = "auto",
    skip: Collection[str] = (),
) -> Any:
    """Load the base model's pipeline, of its family's class (loramill.models.families;
    ``family``: base_model_family, which the model must agree with). ``dtype``: one for every
    component, or one per component name with the others' under ``default``. ``skip``:
    components not loaded (None in the pipeline): a job that needs part of a 12 B model."""
    source = resolve_base_model(spec)
    code = base_family(spec, family)
    try:
        pipe = code.pipeline_class().from_pretrained(
            source,
            **dict.fromkeys(skip),
            dtype={k: torch_dtype(v) for k, v in dtype.items()}
            if isinstance(dtype, dict)
            else torch_dtype(dtype),
            # None: prefer safetensors, fall back to pickle files (opt-in only).
            use_safetensors=None if allow_unsafe_weights else True,
            local_files_only=Path(source).exists(),
            **code.pipeline_options(),
        )
    except (OSError, ValueError) as error:
        raise load_error(spec, error) from error
    pipe.set_progress_bar_config(disable=True)
    return pipe


def base_family(spec: str, family: str = "auto") -> Any:
    """The family code of base model ``spec`` (``family``: base_model_family), before it loads."""
    return family_code(image_family(resolve_base_model(spec), family) or "sd1")


def pipeline_family(pipe: Any) -> Any:
    """The family code of a loaded pipeline (loramill.models.sd, .sdxl or .flux)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        config = transformer.config
        name = transformer_family(type(pipe).__name__, config)
        return family_code(name, guidance_embeds=bool(config.get("guidance_embeds")))
    return family_code(unet_family(pipe.unet.config))


def denoiser(pipe: Any) -> Any:
    """The pipeline's denoising model: its UNet, or its transformer."""
    return getattr(pipe, pipeline_family(pipe).denoiser)


def text_parts(pipe: Any) -> tuple[list[Any], list[Any]]:
    """The pipeline's tokenizers and text encoders, in its family's order."""
    family = pipeline_family(pipe)
    tokenizers = [getattr(pipe, name) for name in family.tokenizers]
    return tokenizers, [getattr(pipe, name) for name in family.text_encoders]


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
        raise load_error(spec, error) from error


# Floating-point safetensors dtypes: weights that load as float32 (integer buffers do not).
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
TRAINED = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2")


@functools.cache
def float32_bytes(spec: str) -> dict[str, int]:
    """Size of each of the base model's denoiser, VAE and text encoders in float32, read from
    the safetensors headers only (a few KB each), for Snakemake's ``mem_mb``."""
    try:
        root = model_folder(spec)
    except LoramillError:
        return {}  # a hub model not downloaded yet: the job will say so
    return {
        c: sum(map(safetensors_float32_bytes, sorted((root / c).glob("*.safetensors"))))
        for c in TRAINED
    }


def safetensors_float32_bytes(path: Path) -> int:
    """What a safetensors file's floating-point tensors take in float32, from its header."""
    with open(path, "rb") as handle:
        header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
    return sum(
        math.prod(entry["shape"]) * 4
        for name, entry in header.items()
        if name != "__metadata__" and entry["dtype"] in FLOAT_DTYPES
    )


# A training step's memory beyond LoRA's, per byte of float32 weights, by network type: peft's
# LoHa and LoKr layers build each module's whole weight change every forward, DoRA its merged
# weight's norms (bench/README.md: SD1.5, kohya network, 256 px: +1.56, +0.93, +0.39 GiB).
NETWORK_TYPE_MEMORY = {"lora": 0.0, "loha": 0.4, "lokr": 0.25, "dora": 0.1}


def job_mem_mb(
    spec: str,
    resolution: int,
    batch_size: int,
    training: bool,
    half: Collection[str] = (),
    network_type: str = "lora",
) -> int:
    """A realistic memory request for a model job: the weights in float32 (the ``half``
    components in half precision), plus activations, plus a training step's network type's.

    Calibrated on the SD1.5 architecture (bench/README.md): with 4.0 GiB of float32 weights a
    LoRA step peaked at 6.1 GiB at 512 px and 4.4 GiB (5.2 GiB in bf16) at 256 px, batch 1;
    this asks 7.0 and 5.8 GiB (LoHa: peak 6.1 GiB at 256 px, asks 7.4). A bf16 Flux step at
    512 px peaked near 29.6 GiB (extrapolated from full width, reduced depth), its transformer
    alone 22.2 GiB in bf16; this asks 30 GiB for the transformer (and more for T5, which the
    job loads to fill the caption cache).
    """
    sizes = float32_bytes(spec)
    weights_mb = sum(size / (2 if c in half else 1) for c, size in sizes.items()) / 2**20
    per_image_mb = (1600 if training else 600) * (resolution / 512) ** 2
    network = NETWORK_TYPE_MEMORY[network_type] if training else 0.0
    return int(weights_mb * (1.25 + network) + per_image_mb * batch_size + 500)


def use_sdpa(pipe: Any, on: bool) -> None:
    """torch's scaled_dot_product_attention in the UNet and text encoder (both libraries'
    default), or with ``on`` False the plain math attention (train.sdpa)."""
    if on:
        return
    from diffusers.models.attention_processor import AttnProcessor

    denoiser(pipe).set_attn_processor(AttnProcessor())
    for text_encoder in text_parts(pipe)[1]:
        text_encoder.set_attn_implementation("eager")
