"""Text datasets: jsonl records read, checked, rendered and tokenized.

A record is one JSON object per line of ``train.jsonl`` / ``eval.jsonl``, one of:

- ``{"text": "..."}``: trained on as a whole;
- ``{"prompt": "...", "response": "..."}``: the response is what the adapter learns (the
  loss can be kept to it);
- ``{"messages": [{"role": "user", "content": "..."}, ..., {"role": "assistant", ...}]}``:
  rendered with the tokenizer's chat template; the last assistant message is the response.

A bad record is refused naming file and line. Records longer than ``max_seq_length`` tokens
are truncated or dropped, and counted.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramill import LoramillError

ROLES = ("system", "user", "assistant")
IGNORE = -100  # the label of a token that carries no loss (torch's cross_entropy default)
OVERFLOW = ("truncate", "drop")


@dataclass(frozen=True)
class Record:
    """One validated record: ``messages`` for chat records, else prompt and response."""

    where: str  # file:line, for messages about it
    prompt: str = ""
    response: str = ""
    messages: tuple[tuple[str, str], ...] = ()

    def key(self) -> str:
        """Its content hash: the hold-out split is decided by it, not by position."""
        body = json.dumps([self.prompt, self.response, self.messages])
        return hashlib.sha256(body.encode()).hexdigest()


def _text(value: Any, where: str, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise LoramillError(f"{where}: '{name}' must be a non-empty string")
    return value


def _messages(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise LoramillError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for n, message in enumerate(value):
        if not isinstance(message, dict) or set(message) != {"role", "content"}:
            raise LoramillError(f'{where}: messages[{n}] must be {{"role", "content"}}')
        if message["role"] not in ROLES:
            raise LoramillError(
                f"{where}: messages[{n}] role '{message['role']}': use one of {', '.join(ROLES)}"
            )
        out.append((message["role"], _text(message["content"], where, f"messages[{n}].content")))
    if out[-1][0] != "assistant":
        raise LoramillError(f"{where}: the last message must be the assistant's (the response)")
    return tuple(out)


def parse_record(line: str, where: str) -> Record:
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise LoramillError(f"{where}: not JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise LoramillError(f"{where}: a record must be a JSON object")
    kinds = [k for k in (("text",), ("prompt", "response"), ("messages",)) if k[0] in data]
    if len(kinds) != 1:
        raise LoramillError(
            f"{where}: a record has exactly one of 'text', 'prompt' + 'response' or 'messages'"
        )
    (kind,) = kinds
    extra = sorted(set(data) - set(kind))
    if extra:
        raise LoramillError(f"{where}: unknown field '{extra[0]}' beside {' + '.join(kind)}")
    if kind == ("text",):
        return Record(where, response=_text(data["text"], where, "text"))
    if kind == ("messages",):
        return Record(where, messages=_messages(data["messages"], where))
    if "response" not in data:
        raise LoramillError(f"{where}: 'prompt' without 'response'")
    return Record(where, _text(data["prompt"], where, "prompt"),
                  _text(data["response"], where, "response"))  # fmt: skip


def read_records(path: str | os.PathLike) -> list[Record]:
    """Every record of a jsonl file; blank lines are skipped, line numbers count from 1."""
    records = []
    try:
        with open(path, encoding="utf-8") as handle:
            for number, line in enumerate(handle, start=1):
                if line.strip():
                    records.append(parse_record(line, f"{path}:{number}"))
    except UnicodeDecodeError as error:
        raise LoramillError(f"{path}: not UTF-8 text ({error.reason})") from None
    if not records:
        raise LoramillError(f"{path}: no records")
    return records


def hold_out(records: Sequence[Record], fraction: float) -> tuple[list[Record], list[Record]]:
    """(train, eval) without an eval.jsonl: a record goes to eval when its content hash falls
    in the lowest ``fraction``, so adding or reordering records moves no other record."""
    cut = int(fraction * 2**32)
    held = [r for r in records if int(r.key()[:8], 16) < cut]
    if not held or len(held) == len(records):
        raise LoramillError(
            f"eval split of {fraction:g} leaves {len(held)} of {len(records)} records for "
            "evaluation; give an eval.jsonl or another eval_fraction"
        )
    return [r for r in records if int(r.key()[:8], 16) >= cut], held


@dataclass
class Tokenized:
    """Token ids and labels per example; labels are IGNORE where no loss is taken. Packed
    (``segments`` set), each row holds whole examples end to end, of the lengths listed."""

    input_ids: list[list[int]] = field(default_factory=list)
    labels: list[list[int]] = field(default_factory=list)
    truncated: int = 0
    dropped: int = 0
    segments: list[list[int]] = field(default_factory=list)

    @property
    def examples(self) -> int:
        """How many examples, packed or not."""
        return sum(map(len, self.segments)) or len(self.input_ids)


def render(record: Record, tokenizer: Any) -> tuple[str, str]:
    """(prompt, response) text; chat records through the tokenizer's chat template."""
    if not record.messages:
        return record.prompt, record.response
    if not getattr(tokenizer, "chat_template", None):
        raise LoramillError(f"{record.where}: 'messages' needs a tokenizer with a chat template")
    chat = [{"role": role, "content": content} for role, content in record.messages]
    prompt = tokenizer.apply_chat_template(chat[:-1], tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(chat, tokenize=False)
    if not full.startswith(prompt):
        raise LoramillError(f"{record.where}: the chat template renders the prompt differently")
    return prompt, full[len(prompt) :]


def tokenize(
    records: Sequence[Record], tokenizer: Any, max_seq_length: int, overflow: str,
    response_only: bool,
) -> Tokenized:  # fmt: skip
    """Token ids (BOS, prompt, response, EOS) and labels; ``response_only`` masks the prompt."""
    if overflow not in OVERFLOW:
        raise LoramillError(f"overflow '{overflow}': use one of {', '.join(OVERFLOW)}")
    out = Tokenized()
    for record in records:
        prompt, response = render(record, tokenizer)
        head = (
            tokenizer(prompt, add_special_tokens=True)["input_ids"]
            if prompt
            else ([tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else [])
        )
        tail = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = head + tail
        labels = ([IGNORE] * len(head) if response_only else list(head)) + tail
        if len(ids) > max_seq_length:
            if overflow == "drop":
                out.dropped += 1
                continue
            out.truncated += 1
            ids, labels = ids[:max_seq_length], labels[:max_seq_length]
        if all(label == IGNORE for label in labels[1:]):
            out.dropped += 1  # the prompt alone fills the window: nothing to learn
            continue
        out.input_ids.append(ids)
        out.labels.append(labels)
    return out


def pad_batch(ids: Sequence[list[int]], labels: Sequence[list[int]], pad_id: int) -> dict:
    """Right-padded tensors for one batch: input_ids, attention_mask, labels (IGNORE on pads)."""
    import torch

    width = max(len(row) for row in ids)
    batch = {
        "input_ids": [row + [pad_id] * (width - len(row)) for row in ids],
        "attention_mask": [[1] * len(row) + [0] * (width - len(row)) for row in ids],
        "labels": [row + [IGNORE] * (width - len(row)) for row in labels],
    }
    return {name: torch.tensor(rows) for name, rows in batch.items()}


def packed_batch(
    ids: Sequence[list[int]], labels: Sequence[list[int]], segments: Sequence[list[int]],
    pad_id: int,
) -> dict:  # fmt: skip
    """Tensors for a batch of packed rows: input_ids, labels and position_ids that start
    again at 0 for each example, and no attention mask. From these position ids transformers
    keeps attention within each example (a block-diagonal mask under SDPA and eager; the
    varlen kernel under flash-attention). A row's padding is one more segment, of IGNORE."""
    import torch

    width = max(len(row) for row in ids)
    positions = []
    for row, lengths in zip(ids, segments, strict=True):
        pad = [width - len(row)] if width > len(row) else []
        positions.append([p for length in [*lengths, *pad] for p in range(length)])
    batch = {
        "input_ids": [row + [pad_id] * (width - len(row)) for row in ids],
        "labels": [row + [IGNORE] * (width - len(row)) for row in labels],
        "position_ids": positions,
    }
    return {name: torch.tensor(rows) for name, rows in batch.items()}


def pack(tokenized: Tokenized, block: int) -> Tokenized:
    """Whole examples packed into rows of at most ``block`` tokens (best fit, longest first:
    few rows, little padding); no example is cut. Each example's first label is IGNORE: in a
    row it follows another example, whose last token must not learn to predict it (alone,
    the first token is never a target either)."""
    sizes = [len(row) for row in tokenized.input_ids]
    rows: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (room left, row), sorted: the best fit is a bisection
    for index in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        at = bisect.bisect_left(space, (sizes[index], -1))
        if at == len(space):
            rows.append([])
            room, row = block, len(rows) - 1
        else:
            room, row = space.pop(at)
        rows[row].append(index)
        if room > sizes[index]:
            bisect.insort(space, (room - sizes[index], row))
    out = Tokenized(truncated=tokenized.truncated, dropped=tokenized.dropped)
    for members in rows:
        out.input_ids.append([t for i in members for t in tokenized.input_ids[i]])
        out.labels.append([t for i in members for t in [IGNORE, *tokenized.labels[i][1:]]])
        out.segments.append([sizes[i] for i in members])
    return out


def describe(tokenized: Tokenized, path: Path | str) -> str:
    """The prepare log line for one file."""
    return (
        f"{path}: {len(tokenized.input_ids)} examples, {tokenized.truncated} truncated, "
        f"{tokenized.dropped} dropped"
    )
