"""Loading the language model of a text dataset: a local transformers folder or a hub id.

Which of its files count, its fingerprint and its download are in loramill.model_files.
Weights load from safetensors unless the user opts in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.model_files import language_model_files, load_error, resolve_language_model
from loramill.models.base_model import safetensors_float32_bytes, torch_dtype

# text.train's options that load the base quantized (QLoRA), named as transformers names them
QUANTIZING_OPTIONS = ("load_in_4bit", "load_in_8bit")


def _local(source: str) -> dict[str, Any]:
    return {"local_files_only": Path(source).exists()}


def load_tokenizer(spec: str) -> Any:
    """The model's tokenizer, with a pad token (its EOS) where it has none: batches pad."""
    from transformers import AutoTokenizer

    source = resolve_language_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_local(source))
    except (OSError, ValueError) as error:
        raise load_error(spec, error) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    spec: str,
    dtype: str = "float32",
    allow_unsafe_weights: bool = False,
    quantization: dict[str, Any] | None = None,
    device: Any = None,
    attention: str | None = None,
) -> Any:
    """The frozen base model, in eval mode, on ``device`` (default: the CPU). With
    ``quantization`` (BitsAndBytesConfig's arguments, TextTrainConfig.quantization) its Linear
    weights are quantized by bitsandbytes as they load onto the device. ``attention``:
    transformers' attention implementation (default: its own choice, SDPA)."""
    from transformers import AutoModelForCausalLM

    source = resolve_language_model(spec)
    extra = _quantized_loading(quantization, device) if quantization else {}
    extra |= {"attn_implementation": attention} if attention else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=torch_dtype(dtype),
            use_safetensors=None if allow_unsafe_weights else True,  # None: pickle allowed
            **_local(source),
            **extra,
        )
    except (OSError, ValueError) as error:
        raise load_error(spec, error) from error
    if device is not None and not quantization:  # a quantized model is loaded in place
        model.to(device)
    return model.eval().requires_grad_(False)


def quantizing_option(options: dict[str, Any]) -> str | None:
    """Which of ``QUANTIZING_OPTIONS`` ``options`` (text.train's, or the BitsAndBytesConfig
    arguments made from them) sets, if any."""
    return next((name for name in QUANTIZING_OPTIONS if options.get(name)), None)


def _quantized_loading(quantization: dict[str, Any], device: Any) -> dict[str, Any]:
    """from_pretrained's arguments that quantize the weights as they load, on ``device``
    (a quantized model cannot be moved after)."""
    import torch
    from transformers import BitsAndBytesConfig

    # here, not at the top: the workflow imports this module to plan, without torch
    from loramill.models.quantize import check_quantize_device, require_bitsandbytes

    key = f"train.{quantizing_option(quantization)}"
    device = torch.device(device or "cpu")
    check_quantize_device(device, key)
    require_bitsandbytes(key)
    return {"quantization_config": BitsAndBytesConfig(**quantization), "device_map": {"": device}}


def model_config(spec: str) -> dict[str, Any]:
    """The model's config.json, as a dict."""
    from transformers import AutoConfig

    source = resolve_language_model(spec)
    try:
        return AutoConfig.from_pretrained(source, **_local(source)).to_dict()
    except (OSError, ValueError) as error:
        raise load_error(spec, error) from error


def text_job_mem_mb(spec: str, training: bool) -> int:
    """A memory request for a text job: the float32 weights, twice over when training
    (activations, gradients through the frozen layers), plus the interpreter and libraries."""
    try:
        folder = Path(resolve_language_model(spec))
    except LoramillError:
        return 0
    weights = [folder / f for f in language_model_files(folder) if f.endswith(".safetensors")]
    weights_mb = sum(map(safetensors_float32_bytes, weights)) / 2**20 if folder.exists() else 0
    return int(weights_mb * (2.0 if training else 1.25) + 1000)
