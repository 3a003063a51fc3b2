"""Evaluating text adapters, the text analogue of the image grid: the eval
split's loss and perplexity, and greedy generations for configured prompts, with the adapter
off (strength 0: the base model, once) and on (strength 1) at every checkpoint; as Markdown,
JSON and an HTML page for the report.

The base model is loaded once; each checkpoint's adapter is loaded beside it, evaluated and
dropped (the first stays: peft keeps one), so memory holds one base and at most two adapters
whatever the number of checkpoints.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from loramill.files import write_json, write_text
from loramill.models.checkpoint import step_of
from loramill.report_pages import markdown_page
from loramill.text.loop import eval_loss
from loramill.text.records import Tokenized

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int) -> str:
    """Greedy continuation of ``prompt`` (deterministic), without the prompt."""
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(model.device)
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
        do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _row(model: Any, tokenizer: Any, data: Tokenized, prompts: Sequence[str],
         max_new_tokens: int, step: int, strength: int) -> dict[str, Any]:  # fmt: skip
    loss = eval_loss(model, data, tokenizer.pad_token_id)
    return {
        "step": step, "strength": strength, "eval_loss": loss, "perplexity": math.exp(loss),
        "generations": [generate(model, tokenizer, p, max_new_tokens) for p in prompts],
    }  # fmt: skip


def evaluate(
    base: Any, tokenizer: Any, checkpoints: Sequence[str | os.PathLike], data: Tokenized,
    prompts: Sequence[str], max_new_tokens: int = 32,
) -> list[dict[str, Any]]:  # fmt: skip
    """The base model (step 0, strength 0: the adapter off, the same for every checkpoint),
    then one row per checkpoint folder (``step-NNNNNN``, strength 1), in step order."""
    from peft import PeftModel

    base.eval()
    rows = [_row(base, tokenizer, data, prompts, max_new_tokens, step=0, strength=0)]
    model, first = None, ""
    for path in sorted(map(Path, checkpoints), key=lambda p: p.name):
        name = path.name.replace("-", "_")
        if model is None:
            model, first = PeftModel.from_pretrained(base, str(path), adapter_name=name), name
        else:
            model.load_adapter(str(path), adapter_name=name)
        model.set_adapter(name)
        model.eval()
        step = step_of(path.name)
        rows.append(_row(model, tokenizer, data, prompts, max_new_tokens, step, strength=1))
        if name != first:
            model.set_adapter(first)
            model.delete_adapter(name)
    return rows


def _cell(text: str) -> str:
    return text.strip().replace("|", "\\|").replace("\n", "<br>") or "(empty)"


def _label(row: dict[str, Any]) -> str:
    return "base (adapter off)" if row["strength"] == 0 else f"step {row['step']}"


def markdown(rows: Sequence[dict[str, Any]], prompts: Sequence[str]) -> str:
    """The evaluation as Markdown: a loss table, then per prompt the generation of the base
    and of each checkpoint."""
    lines = ["| model | eval loss | perplexity |", "| --- | --- | --- |"]
    lines += [f"| {_label(r)} | {r['eval_loss']:.4f} | {r['perplexity']:.2f} |" for r in rows]
    for n, prompt in enumerate(prompts):
        lines += ["", f"**{_cell(prompt)}**", "", "| model | generation |", "| --- | --- |"]
        lines += [f"| {_label(r)} | {_cell(r['generations'][n])} |" for r in rows]
    return "\n".join(lines) + "\n"


def html(rows: Sequence[dict[str, Any]], prompts: Sequence[str], title: str) -> str:
    """The Markdown evaluation as a standalone HTML page (for the Snakemake report)."""
    return markdown_page(f"# {title}\n\n{markdown(rows, prompts)}", title)


def evaluate_text(
    checkpoints_dir: str, eval_tokens: str, markdown_path: str, json_path: str, html_path: str,
    language_model: str, settings: dict[str, Any], device: str = "auto",
    allow_unsafe_weights: bool = False,
) -> list[dict[str, Any]]:  # fmt: skip
    """The text_evaluate stage: every checkpoint on the eval split, written three ways."""
    from loramill.devices import resolve_device
    from loramill.text.export import checkpoint_folders
    from loramill.text.language_model import load_causal_lm, load_tokenizer
    from loramill.text.prepare import read_tokens

    tokenizer = load_tokenizer(language_model)
    base = load_causal_lm(language_model, allow_unsafe_weights=allow_unsafe_weights)
    base.to(resolve_device(device))
    prompts = settings["prompts"]
    rows = evaluate(base, tokenizer, checkpoint_folders(checkpoints_dir), read_tokens(eval_tokens),
                    prompts, settings["max_new_tokens"])  # fmt: skip
    for row in rows:
        log.info("%s: eval loss %.4f, perplexity %.2f", _label(row), row["eval_loss"],
                 row["perplexity"])  # fmt: skip
    write_json(json_path, {"prompts": prompts, "rows": rows})
    write_text(markdown_path, markdown(rows, prompts))
    write_text(html_path, html(rows, prompts, "Text adapter evaluation"))
    return rows
