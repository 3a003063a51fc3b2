"""``quantize_base``: a frozen base model's Linear weights in 8 or 4 bits, by bitsandbytes.

- ``int8``: LLM.int8 (per-row absmax int8 weights, outlier features above 6.0 in half
  precision, transformers' ``load_in_8bit`` default): a quarter of float32's memory, half of
  bfloat16's.
- ``nf4``: QLoRA's 4-bit NormalFloat in blocks of 64, computed in the run's precision
  (bfloat16, float16, or float32 without mixed precision): an eighth of float32's memory.

bitsandbytes is the ``quantize`` extra, not a dependency (pyproject.toml says why). Why
bitsandbytes: its wheel carries CPU and CUDA kernels that run with torch 2.13, so a test on
CPU runs the code a GPU run does; it is what QLoRA and peft's quantized LoRA layers are built
on. (diffusers' bitsandbytes loader refuses to run where no GPU is present, and its
optimum-quanto backend is deprecated.)

Each frozen Linear becomes bitsandbytes' module holding the same, not yet quantized weight;
bitsandbytes quantizes a weight when it is moved to its device. Moving the model there thus
quantizes it one weight at a time, so a GPU holds one unquantized weight at a time, not the
model (bitsandbytes' design; not measured here, where no GPU was lent). The LoRA layers on
top are peft's, untouched, and stay float32. Quantizing is a rounding of the base done once,
deterministically, with no random draws: the LoRA init and every later draw are those of an
unquantized run.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch

from loramill import LoramillError

KINDS = ("int8", "nf4")
LIBRARY = ("bitsandbytes",)  # what a quantized run's provenance adds to its versions
DEVICES = ("cpu", "cuda")  # bitsandbytes' kernels for both ship in its wheel
INT8_THRESHOLD = 6.0  # LLM.int8's outlier threshold, as transformers' load_in_8bit


def check_quantize_device(device: torch.device, key: str = "train.quantize_base") -> None:
    """``key``: the option that asked for bitsandbytes, named in the error."""
    if device.type not in DEVICES:
        raise LoramillError(
            f"{key}: the device '{device}' has no bitsandbytes kernels; "
            f"use it on {' or '.join(DEVICES)}, or drop {key.rsplit('.', 1)[-1]}"
        )


def require_bitsandbytes(key: str = "train.quantize_base") -> Any:
    # By name, not by an import statement: a stage's fingerprint holds the release of every
    # distribution its code imports (loramill.reruns.code), and installing the extra must not
    # retrain the runs that do not quantize. A quantized run's provenance names the version
    # (LIBRARY, in loramill.train.loop); a new bitsandbytes alone does not rerun it.
    try:
        bitsandbytes = importlib.import_module("bitsandbytes")
    except ImportError:
        raise LoramillError(
            f"{key}: needs bitsandbytes, which is not installed here; "
            "pip install 'loramill[quantize]'"
        ) from None
    return bitsandbytes


def _quantized(bnb: Any, linear: torch.nn.Linear, kind: str, compute_dtype: torch.dtype) -> Any:
    shape = (linear.in_features, linear.out_features)
    bias = linear.bias is not None
    weight = linear.weight.data
    if kind == "nf4":
        module = bnb.nn.Linear4bit(
            *shape, bias=bias, compute_dtype=compute_dtype, quant_type="nf4", device="meta"
        )
        module.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
    else:
        module = bnb.nn.Linear8bitLt(
            *shape, bias=bias, has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta"
        )
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if bias:
        module.bias = linear.bias
    return module


def quantize_linears(model: torch.nn.Module, kind: str, compute_dtype: torch.dtype) -> int:
    """Replace every frozen Linear of ``model`` (a LoRA layer's base included) by its
    bitsandbytes module of ``kind``; the number replaced. The weights are quantized when the
    model is next moved to a device (``model.to(device)``)."""
    if kind not in KINDS:
        raise LoramillError(f"train.quantize_base '{kind}': use {' | '.join(KINDS)}")
    bnb = require_bitsandbytes()  # before any module is replaced
    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            # exactly torch's Linear: not a LoRA layer, not a module already quantized
            if type(child) is torch.nn.Linear and not child.weight.requires_grad:
                setattr(parent, name, _quantized(bnb, child, kind, compute_dtype))
                replaced += 1
    return replaced
