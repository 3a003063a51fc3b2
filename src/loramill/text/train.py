"""The text_train stage: LoRA training of a causal language model on tokenized text records.

The base loaded as the options say (loramill.text.train_config: QLoRA's quantized base, on the
run's device), and the run: in this process, or with ``num_processes`` in that many
data-parallel workers started by the image training's launcher (loramill.train.distributed).
The loop itself is loramill.text.loop.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from loramill.devices import resolve_device
from loramill.models.checkpoint import checkpoint_steps
from loramill.models.quantize import LIBRARY as QUANTIZING_LIBRARY
from loramill.software import installed
from loramill.text.language_model import load_causal_lm, load_tokenizer
from loramill.text.loop import packed_attention, text_accelerator, train_text_lora
from loramill.text.prepare import read_tokens
from loramill.text.records import Tokenized
from loramill.text.train_config import TextTrainConfig
from loramill.train.distributed import check_gpus, in_worker, launch
from loramill.train.progress import plot_loss
from loramill.train.state import STATE_ROOT, RunState, trajectory_key

log = logging.getLogger(__name__)
STOPS = ("max_train_steps", "save_steps")  # options that only decide where a run stops


def _base(
    spec: str, cfg: TextTrainConfig, device: torch.device, allow_unsafe_weights: bool,
    data: Tokenized,
) -> Any:  # fmt: skip
    """The frozen base, loaded for the run: quantized (QLoRA), on its device, and for packed
    rows with the attention that keeps their examples apart."""
    attention = None
    if data.segments:
        attention = packed_attention(device, cfg.mixed_precision)
        log.info("packed rows: attention kept within each example by %s",
                 attention or "SDPA's block-diagonal mask")  # fmt: skip
    return load_causal_lm(spec, allow_unsafe_weights=allow_unsafe_weights,
                          quantization=cfg.quantization(), device=device,
                          attention=attention)  # fmt: skip


def train_text(
    train_tokens: str, checkpoints_dir: str, loss_png: str, language_model: str,
    config: dict[str, Any], device: str = "auto", allow_unsafe_weights: bool = False,
    state_dir: str | os.PathLike | None = None, stage: dict[str, Any] | None = None,
) -> list[Path]:  # fmt: skip
    """The text_train stage: a LoRA on the base model from the prepared tokens."""
    arguments = dict(locals())  # every argument, for the workers of a multi-process run
    cfg, resolved = TextTrainConfig.from_dict(config), resolve_device(device)
    cfg.check_device(resolved)
    if cfg.num_processes > 1 and not in_worker():
        check_gpus(cfg.num_processes, resolved)
        return [Path(p) for p in launch(train_text, arguments, cfg.num_processes, cfg.threads)]
    torch.set_num_threads(cfg.threads)
    accelerator = text_accelerator(resolved)
    tokenizer = load_tokenizer(language_model)
    data = read_tokens(train_tokens)
    model = _base(language_model, cfg, accelerator.device, allow_unsafe_weights, data)
    provenance = {
        "base_model": language_model,
        "train_config": asdict(cfg),
        **({"versions": installed(QUANTIZING_LIBRARY)} if cfg.quantization() else {}),
        "examples": data.examples,
        "tokens": sum(map(len, data.input_ids)),
        "stage": stage or {},
    }
    _, history, written = train_text_lora(
        model, data, cfg, tokenizer.pad_token_id, checkpoints_dir, state_dir, provenance,
        accelerator,
    )  # fmt: skip
    if accelerator.is_main_process:
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
