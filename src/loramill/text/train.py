"""LoRA training of a causal language model on tokenized text records.

peft's LoRA on the attention projections (q_proj, v_proj by default, as the lora-scripts text
workflow), AdamW, cross-entropy on the labelled tokens only (responses, with
``response_only``). Every draw is seeded — LoRA init, data order, dropout — so the same data
and options give bit-identical adapters on CPU. Checkpoints are peft adapter folders
(``step-NNNNNN/adapter_model.safetensors`` + ``adapter_config.json``), what
``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from loramill import LoramillError
from loramill.config import with_schema_defaults
from loramill.devices import resolve_device
from loramill.files import atomic_folder, write_json
from loramill.models.checkpoint import checkpoint_steps, step_name
from loramill.models.quantize import LIBRARY as QUANTIZING_LIBRARY
from loramill.software import installed
from loramill.text.language_model import (
    QUANTIZING_OPTIONS,
    load_causal_lm,
    load_tokenizer,
    quantizing_option,
)
from loramill.text.prepare import read_tokens
from loramill.text.records import IGNORE, Tokenized, pad_batch
from loramill.train.progress import plot_loss
from loramill.train.state import STATE_ROOT, RunState, trajectory_key

log = logging.getLogger(__name__)
PROVENANCE_FILE = "loramill_provenance.json"
STOPS = ("max_train_steps", "save_steps")  # options that only decide where a run stops


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


def add_text_lora(model: Any, cfg: TextTrainConfig) -> Any:
    """The model with a trainable LoRA on ``cfg.target_modules`` (seeded init)."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules), task_type="CAUSAL_LM",
    )  # fmt: skip
    try:
        return get_peft_model(model, config)
    except ValueError as error:  # peft: "Target modules ... not found in the base model"
        raise LoramillError(f"train.target_modules: {str(error).splitlines()[0]}") from None


def batch_order(count: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches: a seeded permutation per epoch, the last short batch of each kept."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(count, generator=generator).tolist()
        for start in range(0, count, batch_size):
            yield order[start : start + batch_size]


def _batch(
    data: Tokenized, indices: list[int], pad_id: int, device: Any = "cpu"
) -> dict[str, torch.Tensor]:
    ids, labels = [data.input_ids[i] for i in indices], [data.labels[i] for i in indices]
    return {name: tensor.to(device) for name, tensor in pad_batch(ids, labels, pad_id).items()}


@torch.no_grad()
def eval_loss(model: Any, data: Tokenized, pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per labelled token (perplexity = exp of it)."""
    was_training = model.training
    model.eval()
    total, tokens, device = 0.0, 0, next(model.parameters()).device
    for start in range(0, len(data.input_ids), batch_size):
        indices = list(range(start, min(start + batch_size, len(data.input_ids))))
        batch = _batch(data, indices, pad_id, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
            reduction="sum",
        )  # fmt: skip
        total += float(loss)
        tokens += int((labels != IGNORE).sum())
    model.train(was_training)
    if not tokens:
        raise LoramillError("evaluation: no labelled tokens")
    return total / tokens


def canonical_config(path: Path) -> None:
    """peft keeps target_modules as a set and writes it in hash order, which differs from one
    interpreter to the next: sorted, the same adapter is the same bytes on every machine."""
    config = json.loads(path.read_text(encoding="utf-8"))
    for key, value in config.items():
        if key.endswith("modules") and isinstance(value, list):
            config[key] = sorted(value)
    write_json(path, config)


def save_adapter(
    model: Any, folder: str | os.PathLike, provenance: dict[str, Any] | None = None
) -> Path:
    """A peft adapter folder (with the run's provenance), written whole or not at all."""
    with atomic_folder(folder) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        canonical_config(tmp / "adapter_config.json")
        if provenance is not None:
            write_json(tmp / PROVENANCE_FILE, provenance)
    return Path(folder)


def _prepare(model: Any, cfg: TextTrainConfig) -> tuple[Any, Any, Any]:
    """The peft model, its optimizer and the autocast context the steps run in."""
    if cfg.quantization():
        from peft import prepare_model_for_kbit_training

        quantized = sum(type(m).__module__.startswith("bitsandbytes") for m in model.modules())
        if not quantized:
            raise LoramillError("train.load_in_4bit/load_in_8bit: the base was loaded unquantized")
        log.info("%s: %d Linear weights quantized", quantizing_option(vars(cfg)), quantized)
        # QLoRA's preparation: the weights left unquantized in float32, the model frozen
        # (gradient checkpointing is set up below, as for any run)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.gradient_checkpointing:
        # the frozen embeddings' output must carry gradients for the recomputed blocks
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    peft_model = add_text_lora(model, cfg)
    peft_model.train()
    device = next(peft_model.parameters()).device.type
    autocast = torch.autocast(device, torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, torch.optim.AdamW(trainable, lr=cfg.learning_rate), autocast


def _resume(
    run: RunState, peft_model: Any, optimizer: Any, needed: list[int], save: Any
) -> tuple[int, list[dict[str, float]], list[Path]]:
    """Continue from the newest usable state: the checkpoints before it written again from
    their snapshots, the LoRA, optimizer and RNG as they were. (0, [], []) when none."""
    from peft import set_peft_model_state_dict

    start = run.resume_point(needed)
    if not start:
        return 0, [], []
    written = []
    for step in [n for n in needed if n <= start]:
        set_peft_model_state_dict(peft_model, run.load_adapters(step))
        written.append(save(step))
    state = run.load_state(start)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    log.info("resumed from step %d", start)
    return start, [r for r in state["history"] if r["step"] <= start], written


def train_text_lora(
    model: Any, data: Tokenized, cfg: TextTrainConfig, pad_id: int,
    checkpoints_dir: str | os.PathLike, state_dir: str | os.PathLike | None = None,
    provenance: dict[str, Any] | None = None,
) -> tuple[Any, list[dict[str, float]], list[Path]]:  # fmt: skip
    """Train a LoRA on ``model``; return the peft model, the loss history and the checkpoint
    folders written (``step-NNNNNN``, each with ``provenance``). With ``state_dir`` the full
    state is kept there at every checkpoint, and a rerun continues from it exactly
    (loramill.train.state)."""
    from peft import get_peft_model_state_dict

    if not data.input_ids:
        raise LoramillError("no training examples left after tokenization")
    torch.set_num_threads(cfg.threads)
    peft_model, optimizer, autocast = _prepare(model, cfg)
    device = next(peft_model.parameters()).device
    every, end = cfg.save_steps or cfg.max_train_steps, cfg.max_train_steps
    needed = [s for s in range(1, end + 1) if s % every == 0 or s == end]
    run = RunState(state_dir) if state_dir else None
    save = lambda step: save_adapter(  # noqa: E731
        peft_model, Path(checkpoints_dir) / step_name(step, ""), provenance
    )
    torch.manual_seed(cfg.seed)  # LoRA dropout draws from the global generator
    start, history, written = _resume(run, peft_model, optimizer, needed, save) if run else (
        0, [], []
    )  # fmt: skip
    order = batch_order(len(data.input_ids), cfg.train_batch_size, cfg.seed)
    for _ in range(start):  # the batches the saved run already took
        next(order)
    for step in range(start + 1, end + 1):
        with autocast:
            loss = peft_model(**_batch(data, next(order), pad_id, device)).loss
        value = float(loss.detach())
        if not math.isfinite(value):
            raise LoramillError(f"step {step}: loss is {value}; lower text.train.learning_rate")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        history.append({"step": step, "loss": value})
        if step in needed:
            written.append(save(step))
            if run:
                state = {"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
                         "history": history}  # fmt: skip
                run.save(step, get_peft_model_state_dict(peft_model), state)
    log.info("trained to step %d, final loss %.4f", end, history[-1]["loss"])
    return peft_model, history, written


def train_text(
    train_tokens: str, checkpoints_dir: str, loss_png: str, language_model: str,
    config: dict[str, Any], device: str = "auto", allow_unsafe_weights: bool = False,
    state_dir: str | os.PathLike | None = None, stage: dict[str, Any] | None = None,
) -> list[Path]:  # fmt: skip
    """The text_train stage: a LoRA on the base model from the prepared tokens."""
    cfg = TextTrainConfig.from_dict(config)
    tokenizer = load_tokenizer(language_model)
    quantization = cfg.quantization()
    model = load_causal_lm(language_model, allow_unsafe_weights=allow_unsafe_weights,
                           quantization=quantization, device=resolve_device(device))  # fmt: skip
    data = read_tokens(train_tokens)
    provenance = {
        "base_model": language_model,
        "train_config": asdict(cfg),
        **({"versions": installed(QUANTIZING_LIBRARY)} if quantization else {}),
        "examples": len(data.input_ids),
        "tokens": sum(map(len, data.input_ids)),
        "stage": stage or {},
    }
    _, history, written = train_text_lora(
        model, data, cfg, tokenizer.pad_token_id, checkpoints_dir, state_dir, provenance
    )
    saved = checkpoint_steps(cfg.max_train_steps, cfg.save_steps or cfg.max_train_steps)
    plot_loss(history, loss_png, f"text LoRA, rank {cfg.lora_rank}", checkpoints=saved)
    if state_dir:
        RunState(state_dir).finish(keep=True)  # constant LR: a longer run continues this one
    return written


def text_state_dir(parts: dict[str, Any]) -> Path:
    """Where a text_train job keeps its resumable state: keyed on its fingerprint less the
    options that only decide where the run stops (the learning rate is constant, so a longer
    run follows the same trajectory and continues a shorter one)."""
    return STATE_ROOT / f"text-{trajectory_key(parts, 'text.train', STOPS)}"
