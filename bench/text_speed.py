"""Text LoRA training throughput (issue #15): loramill against transformers.Trainer + peft.

Both train the same LoRA (rank 8, alpha 16, no dropout, q/k/v/o/up/down projections) with
AdamW at the same learning rate, on the same tokenized examples (the demo's procedures,
prompt masked), batch 8, padded per batch, for the same number of steps, in one process,
alternating, best of ``--repeats``. Throughput counts real (non-padding) tokens per second of
the training call (at the examples' mean length), model loading excluded. Models, seeded
random weights:

- tiny: the embedded models/tiny-llama (2 layers, hidden 64);
- 100m: a LLaMA of 108 M parameters (14 layers, hidden 768, intermediate 2304) on the
  tiny tokenizer's vocabulary;
- 1b: Llama 3.2 1B's shape (16 layers, hidden 2048, intermediate 8192, 32 heads, 8 KV heads:
  0.97 B parameters) on the tiny tokenizer's vocabulary.

With bf16 the Trainer runs twice: as the peft docs set it up (the float32 base, ``bf16=True``:
autocast) and with the base loaded in bf16 (norms and the residual stream in bf16 too: other
numbers, and what many users do).

    .venv/bin/python bench/text_speed.py [--models tiny 100m] [--steps 20] [--repeats 2]
        [--precision fp32 bf16] [--device cpu|cuda] [--profile DIR] [--qlora] [--packing]
        [--vocab 384]

--packing adds loramill on the same examples packed (``text.prepare.packing``: whole examples
end to end in rows of up to 128 tokens, attention kept within each), counted by the same real
tokens, and the Trainer with as many examples per step as those rows hold (its batches
padded), as the control. --qlora adds, in bf16, loramill on the base loaded in
NF4 by bitsandbytes (QLoRA; needs ``make .venv/.bitsandbytes`` and
``PYTHONPATH=.venv/bitsandbytes``), which the text_train stage refuses on a CPU (issue #33):
this measures why.

--vocab N builds the 100m and 1b models with an N-token vocabulary (their embedding and output
head; the examples' token ids stay the tiny tokenizer's). Real models have 32 000 (Llama 2,
Mistral) to 262 144 (Gemma 3) tokens, where the output projection is a large share of a step.

--profile DIR runs each side's timed call once under torch.profiler instead and writes its
operators by self CPU time to DIR/<model>-<precision>-<side>.txt (issue #28).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "models" / "tiny-llama"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
BATCH, LR, SEQ = 8, 5e-4, 128


def examples():
    from loramill.demo.text import TASKS, UNITS, procedure_records
    from loramill.text.language_model import load_tokenizer
    from loramill.text.records import parse_record, tokenize

    tokenizer = load_tokenizer(str(TINY))
    records = [
        parse_record(json.dumps(r), f"demo:{n}")
        for n, r in enumerate(procedure_records(len(TASKS) * len(UNITS)))
    ]
    return tokenizer, tokenize(records, tokenizer, SEQ, "truncate", response_only=True)


SHAPES = {  # LlamaConfig's sizes of the models built here
    "100m": {"hidden_size": 768, "intermediate_size": 2304, "num_hidden_layers": 14,
             "num_attention_heads": 12, "num_key_value_heads": 12},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8},
}  # fmt: skip


def build(kind: str, device: str, dtype: torch.dtype = torch.float32, vocab: int = 384):
    from transformers import LlamaConfig, LlamaForCausalLM

    from loramill.text.language_model import load_causal_lm

    if kind == "tiny":
        return load_causal_lm(str(TINY)).to(device, dtype)
    config = LlamaConfig(
        vocab_size=vocab, max_position_embeddings=512, bos_token_id=0, eos_token_id=1,
        pad_token_id=2, tie_word_embeddings=False, **SHAPES[kind],
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval().requires_grad_(False).to(device, dtype)


def quantized(kind: str, device: str, vocab: int = 384):
    """``build(kind)`` saved and loaded back as text_train loads a QLoRA base: NF4 weights,
    double-quantized, computed in bf16."""
    from loramill.text.language_model import load_causal_lm
    from loramill.text.train import TextTrainConfig

    nf4 = TextTrainConfig.from_dict({"load_in_4bit": True, "mixed_precision": "bf16"})
    with tempfile.TemporaryDirectory() as folder:
        build(kind, "cpu", vocab=vocab).save_pretrained(folder)
        return load_causal_lm(folder, quantization=nf4.quantization(), device=device)


def real_tokens(data, steps: int, batch: int = BATCH) -> float:
    """Non-padding tokens in ``steps`` batches, at the rows' mean length (the two sides draw
    their batches in different orders; the demo's examples differ by a few tokens)."""
    return steps * batch * sum(map(len, data.input_ids)) / len(data.input_ids)


def run_loramill(
    model, data, pad_id: int, steps: int, precision: str, quantized: bool = False
) -> float:
    from loramill.text.loop import train_text_lora
    from loramill.text.train import TextTrainConfig

    cfg = TextTrainConfig.from_dict({
        "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": TARGETS,
        "learning_rate": LR, "max_train_steps": steps, "train_batch_size": BATCH,
        "mixed_precision": "bf16" if precision == "bf16" else "no",
        "threads": torch.get_num_threads(), "load_in_4bit": quantized,
    })  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_text_lora(model, data, cfg, pad_id, tmp)
        return time.perf_counter() - start


def run_trainer(
    model, data, tokenizer, steps: int, precision: str, device: str, batch: int = BATCH
) -> float:
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.manual_seed(0)
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                      task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, lora)
    rows = [{"input_ids": i, "attention_mask": [1] * len(i), "labels": lab}
            for i, lab in zip(data.input_ids, data.labels, strict=True)]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, max_steps=steps, per_device_train_batch_size=batch,
            learning_rate=LR, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
            optim="adamw_torch", bf16=precision == "bf16", logging_strategy="no",
            save_strategy="no", report_to=[], seed=0, dataloader_num_workers=0,
            use_cpu=device == "cpu", disable_tqdm=True,
        )  # fmt: skip
        collator = DataCollatorForSeq2Seq(tokenizer, padding=True)  # labels padded with -100
        trainer = Trainer(model=peft_model, args=args, train_dataset=rows, data_collator=collator)
        start = time.perf_counter()
        trainer.train()
        elapsed = time.perf_counter() - start
    peft_model.unload()  # the base model back without LoRA layers, for the next run
    return elapsed


def profiled(out: Path, run, *args) -> float:
    """``run(*args)`` under torch.profiler; its operators by self CPU time go to ``out``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        seconds = run(*args)
    table = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    out.write_text(f"{out.stem}: {seconds:.2f} s (profiled)\n{table}\n")
    return seconds


def profile(args: argparse.Namespace, tokenizer, data) -> None:
    args.profile.mkdir(parents=True, exist_ok=True)
    for kind in args.models:
        for precision in args.precision:
            stem = f"{kind}-{precision}"
            runs = {
                "loramill": (run_loramill, tokenizer.pad_token_id, args.steps, precision),
                "trainer": (run_trainer, tokenizer, args.steps, precision, args.device),
            }
            for side, (run, *rest) in runs.items():
                out = args.profile / f"{stem}-{side}.txt"
                model = build(kind, args.device, vocab=args.vocab)
                seconds = profiled(out, run, model, data, *rest)
                print(f"{stem} {side}: {seconds:.2f} s profiled, {out}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny", "100m"], choices=["tiny", *SHAPES])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--profile", type=Path, help="profile each side once into this folder")
    parser.add_argument("--qlora", action="store_true", help="add loramill on an NF4 base (bf16)")
    parser.add_argument("--packing", action="store_true", help="add loramill on packed rows")
    parser.add_argument("--vocab", type=int, default=384, help="the built models' vocabulary")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    tokenizer, data = examples()
    if args.profile:
        profile(args, tokenizer, data)
        return
    for kind in args.models:
        for precision in args.precision:
            rates = compare(kind, precision, args, tokenizer, data)
            # every side against the Trainer as peft's docs set it up
            sides = "; ".join(
                f"{side} {rate:.0f} tok/s ({rate / rates['Trainer+peft']:.2f}x)"
                for side, rate in rates.items()
            )  # fmt: skip
            print(f"{kind:5s} {precision}: {sides}", flush=True)


def compare(kind: str, precision: str, args: argparse.Namespace, tokenizer, data) -> dict:
    """Each side's real tokens per second, at its best time over the repeats, the sides
    alternating, each on a fresh model."""
    pad, steps, device = tokenizer.pad_token_id, args.steps, args.device
    make = functools.partial(build, vocab=args.vocab)
    sides = {
        "loramill": lambda: run_loramill(make(kind, device), data, pad, steps, precision),
        "Trainer+peft": lambda: run_trainer(
            make(kind, device), data, tokenizer, steps, precision, device
        ),
    }
    if precision == "bf16":
        sides["Trainer+peft, bf16 base"] = lambda: run_trainer(
            make(kind, device, torch.bfloat16), data, tokenizer, steps, precision, device
        )
    if precision == "bf16" and args.qlora:
        sides["loramill, NF4 base"] = lambda: run_loramill(
            quantized(kind, device, args.vocab), data, pad, steps, precision, quantized=True
        )
    tokens = dict.fromkeys(sides, real_tokens(data, steps))
    if args.packing:
        from loramill.text.records import pack

        # the same examples, whole, laid end to end in rows of SEQ tokens
        packed = pack(data, SEQ)
        sides["loramill, packed"] = lambda: run_loramill(
            make(kind, device), packed, pad, steps, precision
        )
        tokens["loramill, packed"] = real_tokens(packed, steps)
        # the control: the Trainer given as many examples per step as the packed rows hold,
        # so that larger matrices alone do not pass for packing's gain
        batch = round(BATCH * len(data.input_ids) / len(packed.input_ids))
        sides[f"Trainer+peft, batch {batch}"] = lambda: run_trainer(
            make(kind, device), data, tokenizer, steps, precision, device, batch
        )
        tokens[f"Trainer+peft, batch {batch}"] = real_tokens(data, steps, batch)
    best = dict.fromkeys(sides, float("inf"))
    for _ in range(args.repeats):
        for side, run in sides.items():
            best[side] = min(best[side], run())
    return {side: tokens[side] / seconds for side, seconds in best.items()}


if __name__ == "__main__":
    main()
