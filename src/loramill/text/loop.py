"""The text LoRA training loop: batches, steps, checkpoints and resume, in one process or in
each worker of a data-parallel run (loramill.train.distributed, through accelerate).

peft's LoRA on ``target_modules``, AdamW, cross-entropy on the labelled tokens only. Every
draw is seeded (LoRA init, data order, and dropout afresh at each step), so the same data and
options give bit-identical adapters on CPU, and a resumed run draws what an unbroken one did.
Checkpoints are peft adapter folders (``step-NNNNNN/adapter_model.safetensors`` +
``adapter_config.json``), what ``PeftModel.from_pretrained`` loads.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loramill import LoramillError
from loramill.files import atomic_folder, write_json
from loramill.models.checkpoint import step_name
from loramill.text.language_model import quantizing_option
from loramill.text.records import IGNORE, Tokenized, packed_batch, pad_batch
from loramill.train.distributed import share
from loramill.train.state import RunState

if TYPE_CHECKING:
    from loramill.text.train_config import TextTrainConfig

log = logging.getLogger(__name__)
PROVENANCE_FILE = "loramill_provenance.json"


def text_accelerator(device: torch.device) -> Any:
    """accelerate's handle on the run: in a worker of a multi-process run it joins the DDP
    group torchrun's variables describe (gloo on CPU, NCCL on CUDA) and picks its GPU."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # a process-wide singleton: a second run in one process starts from a clean one
    AcceleratorState._reset_state(reset_partial_state=True)
    return Accelerator(cpu=device.type == "cpu")


def packed_attention(device: torch.device, mixed_precision: str) -> str | None:
    """The attention for packed rows: flash-attention's varlen kernel where it runs (CUDA, the
    flash-attn package, bf16), which reads the examples' bounds from the position ids; else
    None, transformers' default (SDPA), which builds a block-diagonal mask from them."""
    if (
        device.type == "cuda"
        and mixed_precision == "bf16"
        and importlib.util.find_spec("flash_attn")
    ):
        return "flash_attention_2"
    return None


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


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of a step's dropout in one process: no generator state to carry over a resume."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{rank}".encode()).digest()[:8], "big")


def text_batch(
    data: Tokenized, indices: list[int], pad_id: int, device: Any = "cpu"
) -> dict[str, torch.Tensor]:
    """The model's inputs for the examples (or packed rows) ``indices``. Call the model with
    ``use_cache=False``: transformers keeps packed examples apart only without a KV cache."""
    ids, labels = [data.input_ids[i] for i in indices], [data.labels[i] for i in indices]
    if data.segments:
        batch = packed_batch(ids, labels, [data.segments[i] for i in indices], pad_id)
    else:
        batch = pad_batch(ids, labels, pad_id)
    return {name: tensor.to(device) for name, tensor in batch.items()}


def labelled_tokens(data: Tokenized, indices: list[int]) -> int:
    """The tokens that carry loss in these examples: every label but the first's is a target."""
    return sum(label != IGNORE for i in indices for label in data.labels[i][1:])


def summed_loss(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The batch's cross-entropy summed over its labelled tokens. The vocabulary projection
    runs only at the positions that predict a label (transformers' ``logits_to_keep`` mask):
    at the others (prompts, padding) its logits would be thrown away, and with a real
    vocabulary (32 k to 262 k tokens) that projection is a large share of a step's work and
    of its memory. The logits that are kept are the same numbers."""
    targets = batch["labels"][:, 1:]
    labelled = targets != IGNORE
    keep = torch.zeros_like(batch["labels"], dtype=torch.bool)
    keep[:, :-1] = labelled  # position i predicts token i + 1
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
    return torch.nn.functional.cross_entropy(logits.float(), targets[labelled], reduction="sum")


@torch.no_grad()
def eval_loss(model: Any, data: Tokenized, pad_id: int, batch_size: int = 8) -> float:
    """Mean cross-entropy per labelled token (perplexity = exp of it)."""
    was_training = model.training
    model.eval()
    total, device = 0.0, next(model.parameters()).device
    for start in range(0, len(data.input_ids), batch_size):
        indices = list(range(start, min(start + batch_size, len(data.input_ids))))
        total += float(summed_loss(model, text_batch(data, indices, pad_id, device)))
    model.train(was_training)
    tokens = labelled_tokens(data, list(range(len(data.input_ids))))
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


def frozen_linears_in_bf16(model: torch.nn.Module) -> int:
    """Store the frozen Linear weights in bf16; how many. Under bf16 autocast a Linear rounds
    its float32 weight to bf16 afresh at every forward, which on a CPU costs a pass over all
    the weights per step; stored rounded, the products are the same bits without it (and the
    weights take half the memory). The LoRA's own Linears train, and stay float32; a weight
    tied to another module (Gemma's embeddings) stays too: that module reads it unrounded."""
    others = {
        id(p)
        for m in model.modules()
        if not isinstance(m, torch.nn.Linear)
        for p in m.parameters(recurse=False)
    }
    count = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        frozen = weight is not None and not weight.requires_grad and id(weight) not in others
        if type(module) is torch.nn.Linear and frozen:
            module.to(torch.bfloat16)
            count += 1
    return count


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
    if cfg.mixed_precision == "bf16" and not cfg.quantization():
        frozen_linears_in_bf16(peft_model)
    device = next(peft_model.parameters()).device.type
    autocast = torch.autocast(device, torch.bfloat16, enabled=cfg.mixed_precision == "bf16")
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return peft_model, torch.optim.AdamW(trainable, lr=cfg.learning_rate), autocast


def _resume(
    run: RunState, peft_model: Any, optimizer: Any, needed: list[int], save: Callable | None
) -> tuple[int, list[dict[str, float]], list[Path]]:
    """Continue from the newest usable state: the checkpoints before it written again from
    their snapshots (by ``save``: rank 0's job), the LoRA and optimizer as they were, in every
    process. (0, [], []) when none."""
    from peft import set_peft_model_state_dict

    start = run.resume_point(needed)
    if not start:
        return 0, [], []
    written = []
    for step in [n for n in needed if n <= start]:
        set_peft_model_state_dict(peft_model, run.load_adapters(step))
        written += [save(step)] if save else []
    state = run.load_state(start)
    optimizer.load_state_dict(state["optimizer"])
    log.info("resumed from step %d", start)
    return start, [r for r in state["history"] if r["step"] <= start], written


class _Batches:
    """A run's batches as the model takes them, on its device."""

    def __init__(self, data: Tokenized, pad_id: int, device: Any) -> None:
        self.data, self.pad_id, self.device = data, pad_id, device

    def __call__(self, indices: list[int]) -> dict[str, torch.Tensor]:
        return text_batch(self.data, indices, self.pad_id, self.device)

    def tokens(self, indices: list[int]) -> int:
        return labelled_tokens(self.data, indices)


def _step(
    model: Any, optimizer: Any, accelerator: Any, autocast: Any, batch: _Batches, indices: list
) -> float:
    """One optimizer step on the batch ``indices``; its loss per labelled token. Each process
    takes its share of the rows, its summed loss divided by the whole batch's labelled tokens
    (and times the processes, which DDP averages over): the processes together take the
    gradient one process would on the whole batch."""
    rows, scale = share(len(indices), accelerator.process_index, accelerator.num_processes)
    with autocast:
        loss = summed_loss(model, batch(indices[rows])) / batch.tokens(indices)
    loss = loss * (1.0 if scale else 0.0)  # a process without rows: its gradients 0
    accelerator.backward(loss * accelerator.num_processes)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(accelerator.reduce(loss.detach(), "sum"))


def train_text_lora(
    model: Any, data: Tokenized, cfg: TextTrainConfig, pad_id: int,
    checkpoints_dir: str | os.PathLike, state_dir: str | os.PathLike | None = None,
    provenance: dict[str, Any] | None = None, accelerator: Any = None,
) -> tuple[Any, list[dict[str, float]], list[Path]]:  # fmt: skip
    """Train a LoRA on ``model``; return the peft model, the loss history and the checkpoint
    folders written (``step-NNNNNN``, each with ``provenance``; rank 0 writes them). With
    ``state_dir`` the full state is kept there at every checkpoint, and a rerun continues from
    it exactly (loramill.train.state). ``accelerator``: the run's (text_accelerator); by
    default one process on the model's device."""
    from peft import get_peft_model_state_dict

    if not data.input_ids:
        raise LoramillError("no training examples left after tokenization")
    torch.set_num_threads(cfg.threads)
    accelerator = accelerator or text_accelerator(next(model.parameters()).device)
    peft_model, optimizer, autocast = _prepare(model, cfg)
    every, end = cfg.save_steps or cfg.max_train_steps, cfg.max_train_steps
    needed = [s for s in range(1, end + 1) if s % every == 0 or s == end]
    run = RunState(state_dir) if state_dir else None
    main = accelerator.is_main_process
    save = lambda step: save_adapter(  # noqa: E731
        peft_model, Path(checkpoints_dir) / step_name(step, ""), provenance
    )
    resumed = _resume(run, peft_model, optimizer, needed, save if main else None) if run else None
    start, history, written = resumed or (0, [], [])
    wrapped, optimizer = accelerator.prepare(peft_model, optimizer)
    order = batch_order(len(data.input_ids), cfg.train_batch_size * accelerator.num_processes,
                        cfg.seed)  # fmt: skip
    for _ in range(start):  # the batches the saved run already took
        next(order)
    batches = _Batches(data, pad_id, accelerator.device)
    for step in range(start + 1, end + 1):
        torch.manual_seed(step_seed(cfg.seed, step, accelerator.process_index))  # dropout
        value = _step(wrapped, optimizer, accelerator, autocast, batches, next(order))
        if not math.isfinite(value):
            raise LoramillError(f"step {step}: loss is {value}; lower text.train.learning_rate")
        history.append({"step": step, "loss": value})
        if step in needed and main:
            written.append(save(step))
            if run:
                state = {"optimizer": optimizer.state_dict(), "history": history}
                run.save(step, get_peft_model_state_dict(peft_model), state)
    log.info("trained to step %d, final loss %.4f", end, history[-1]["loss"])
    return peft_model, history, written
