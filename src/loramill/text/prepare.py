"""The text_prepare stage: a text dataset's jsonl records checked, split and tokenized.

``train.jsonl`` (and ``eval.jsonl`` when the dataset has one; otherwise a hold-out chosen by
each record's content hash) become token files, one example per line::

    {"input_ids": [...], "labels": [...]}      labels -100 where no loss is taken

With ``packing`` each training line is a row of whole examples, with their lengths in
``"segments": [...]`` (loramill.text.records.pack); evaluation is never packed.

The base model's tokenizer is a param of the stage, so a new tokenizer re-tokenizes and
nothing else does. The log says per file how many examples came out, truncated and dropped.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from loramill import LoramillError
from loramill.files import atomic_open, write_json
from loramill.text.language_model import load_tokenizer
from loramill.text.records import Tokenized, describe, hold_out, pack, read_records, tokenize

log = logging.getLogger(__name__)


def write_tokens(tokenized: Tokenized, path: str | os.PathLike) -> None:
    segments = tokenized.segments or [None] * len(tokenized.input_ids)
    with atomic_open(path) as handle:
        for ids, labels, lengths in zip(tokenized.input_ids, tokenized.labels, segments,
                                        strict=True):  # fmt: skip
            row = {"input_ids": ids, "labels": labels}
            handle.write(json.dumps(row | ({"segments": lengths} if lengths else {})) + "\n")


def read_tokens(path: str | os.PathLike) -> Tokenized:
    """A token file as text_prepare wrote it."""
    out = Tokenized()
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            try:
                row = json.loads(line)
                out.input_ids.append([int(t) for t in row["input_ids"]])
                out.labels.append([int(t) for t in row["labels"]])
                if "segments" in row:
                    out.segments.append([int(n) for n in row["segments"]])
                    if sum(out.segments[-1]) != len(out.input_ids[-1]):
                        raise ValueError("segments do not add up to the row")
                if len(out.labels[-1]) != len(out.input_ids[-1]) or (
                    out.segments and len(out.segments) != len(out.input_ids)
                ):
                    raise ValueError("rows of different lengths, or some packed and some not")
            except (ValueError, KeyError, TypeError) as error:
                raise LoramillError(f"{path}:{number}: not a token record ({error})") from None
    return out


def prepare_text(
    train_jsonl: str, eval_jsonl: list[str], train_tokens: str, eval_tokens: str,
    summary_json: str, settings: dict[str, Any], language_model: str,
) -> dict[str, Any]:  # fmt: skip
    """Tokenize a text dataset; returns the summary written to ``summary_json``."""
    records = read_records(train_jsonl)
    if eval_jsonl:
        train, held = records, read_records(eval_jsonl[0])
    else:
        train, held = hold_out(records, settings["eval_fraction"])
    tokenizer = load_tokenizer(language_model)
    options = (settings["max_seq_length"], settings["overflow"], settings["response_only"])
    summary: dict[str, Any] = {}
    for split, chosen, source, out in (
        ("train", train, train_jsonl, train_tokens),
        ("eval", held, eval_jsonl[0] if eval_jsonl else f"{train_jsonl} (held out)", eval_tokens),
    ):
        tokenized = tokenize(chosen, tokenizer, *options)
        if not tokenized.input_ids:
            raise LoramillError(f"{source}: no {split} examples left (max_seq_length too small?)")
        log.info("%s", describe(tokenized, source))
        if split == "train" and settings["packing"]:
            tokenized = pack(tokenized, settings["max_seq_length"])
            filled = sum(map(len, tokenized.input_ids)) / (
                len(tokenized.input_ids) * settings["max_seq_length"]
            )
            log.info("packed %d examples into %d rows of up to %d tokens, %.0f %% filled",
                     tokenized.examples, len(tokenized.input_ids),
                     settings["max_seq_length"], 100 * filled)  # fmt: skip
        write_tokens(tokenized, out)
        summary[split] = {
            "records": len(chosen),
            "examples": tokenized.examples,
            **({"packed_rows": len(tokenized.input_ids)} if tokenized.segments else {}),
            "tokens": sum(map(len, tokenized.input_ids)),
            "truncated": tokenized.truncated,
            "dropped": tokenized.dropped,
        }
    write_json(summary_json, summary)
    return summary
