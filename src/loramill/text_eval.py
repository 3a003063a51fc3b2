"""Evaluating text adapters (issue #15), the text analogue of the image grid: per checkpoint
the eval split's loss and perplexity, and greedy generations for configured prompts with the
adapter off (strength 0) and on (strength 1), as a Markdown table.

The base model is loaded once; each checkpoint's adapter is loaded beside it, evaluated and
dropped (the first stays: peft keeps one), so memory holds one base and at most two adapters
whatever the number of checkpoints.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loramill.text_data import Tokenized
from loramill.text_train import eval_loss

STEP_PREFIX = "step-"


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (deterministic), without the prompt."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def evaluate(
    base: Any, tokenizer: Any, checkpoints: Sequence[str | os.PathLike], data: Tokenized,
    prompts: Sequence[str], max_new_tokens: int = 32,
) -> list[dict[str, Any]]:  # fmt: skip
    """One row per checkpoint folder (``step-NNNNNN``), in step order."""
    from peft import PeftModel

    rows = []
    model, first = None, ""
    for path in sorted(map(Path, checkpoints), key=lambda p: p.name):
        name = path.name.replace("-", "_")
        if model is None:
            model, first = PeftModel.from_pretrained(base, str(path), adapter_name=name), name
        else:
            model.load_adapter(str(path), adapter_name=name)
        model.set_adapter(name)
        model.eval()
        loss = eval_loss(model, data, tokenizer.pad_token_id)
        with model.disable_adapter():
            off = [generate(model, tokenizer, p, max_new_tokens) for p in prompts]
        on = [generate(model, tokenizer, p, max_new_tokens) for p in prompts]
        step = int(path.name.removeprefix(STEP_PREFIX))
        rows.append({"step": step, "eval_loss": loss, "perplexity": math.exp(loss),
                     "strength_0": off, "strength_1": on})  # fmt: skip
        if name != first:
            model.set_adapter(first)
            model.delete_adapter(name)
    return rows


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def markdown(rows: Sequence[dict[str, Any]], prompts: Sequence[str]) -> str:
    """The evaluation as Markdown: a loss table, then per prompt the generations off and on."""
    lines = ["| step | eval loss | perplexity |", "| --- | --- | --- |"]
    lines += [f"| {r['step']} | {r['eval_loss']:.4f} | {r['perplexity']:.2f} |" for r in rows]
    for n, prompt in enumerate(prompts):
        lines += ["", f"**{_cell(prompt)}**", "", "| step | strength 0 | strength 1 |",
                  "| --- | --- | --- |"]  # fmt: skip
        lines += [
            f"| {r['step']} | {_cell(r['strength_0'][n])} | {_cell(r['strength_1'][n])} |"
            for r in rows
        ]
    return "\n".join(lines) + "\n"
