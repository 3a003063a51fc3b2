"""text.train's options: lora-scripts' names, the schema's defaults, checked as a job reads them."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from loramill import LoramillError
from loramill.config import with_schema_defaults
from loramill.text.language_model import QUANTIZING_OPTIONS, quantizing_option

# QLoRA is a way to fit a large base into a GPU's memory. On the CPU, where memory is not what
# binds, bitsandbytes' CPU kernels trained a 108 M LLaMA at 0.92x bf16 LoRA's tokens/s
# (bench/README.md): slower for no gain, so text QLoRA is refused there (issue #33).
QLORA_DEVICES = ("cuda",)


@dataclass(frozen=True)
@with_schema_defaults("text.train")  # every option's default is the schema's
class TextTrainConfig:
    # lora-scripts' names for the text workflow's options
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...]
    learning_rate: float
    max_train_steps: int
    train_batch_size: int
    save_steps: int  # 0: the last step only
    seed: int
    threads: int
    mixed_precision: str  # no | bf16 (autocast; LoRA weights stay float32)
    gradient_checkpointing: bool  # recompute activations: less memory, slower
    # QLoRA: the frozen base's Linear weights in bitsandbytes' NF4 (double-quantized) or LLM.int8
    load_in_4bit: bool
    load_in_8bit: bool
    # data-parallel workers on this machine (one per GPU on CUDA); the global batch is
    # train_batch_size × num_processes, each process training on its share
    num_processes: int

    @classmethod
    def from_dict(cls, options: dict[str, Any]) -> TextTrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise LoramillError(f"train.{unknown[0]}: not a text training option")
        values = dict(options)
        if "target_modules" in values:
            values["target_modules"] = tuple(values["target_modules"])
        if values.get("mixed_precision", "no") not in ("no", "bf16"):
            raise LoramillError(
                f"train.mixed_precision: '{values['mixed_precision']}': use no or bf16"
            )
        if all(values.get(name) for name in QUANTIZING_OPTIONS):
            raise LoramillError(
                "train.load_in_4bit and train.load_in_8bit: the base is quantized one way; "
                "set one of them"
            )
        return cls(**values)

    def check_device(self, device: Any) -> None:
        """QLoRA's one line on a device it is not for, naming the alternative."""
        option = quantizing_option(vars(self))
        if option and device.type not in QLORA_DEVICES:
            raise LoramillError(
                f"train.{option}: QLoRA needs a CUDA GPU and this job's device is '{device}'; "
                f"train a bf16 LoRA instead (drop {option}, set mixed_precision: bf16)"
            )

    def quantization(self) -> dict[str, Any] | None:
        """transformers' BitsAndBytesConfig arguments for the base, or None. NF4 computes in
        the run's precision: bf16 under mixed precision, else float32."""
        if self.load_in_4bit:
            compute = "bfloat16" if self.mixed_precision == "bf16" else "float32"
            return {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_use_double_quant": True,
                "bnb_4bit_compute_dtype": compute,
            }
        return {"load_in_8bit": True} if self.load_in_8bit else None
