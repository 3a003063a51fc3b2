"""Packing (issue #33): whole examples laid end to end in rows of max_seq_length, attention
kept within each example by position ids that start again per example. A packed batch is the
same loss, and the same LoRA gradient, as the examples unpacked, in every family."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from loramill import LoramillError
from loramill.demo.text import procedure_records
from loramill.demo.tiny_families import FAMILIES
from loramill.demo.tiny_llama import build_causal_lm, build_tokenizer
from loramill.text.loop import add_text_lora, labelled_tokens, text_batch
from loramill.text.prepare import read_tokens, write_tokens
from loramill.text.records import IGNORE, pack, parse_record, tokenize
from loramill.text.train import TextTrainConfig

BLOCK = 128


@pytest.fixture(scope="module")
def texts():
    found = procedure_records(24)
    lines = [json.dumps(r) for r in found]
    records = [parse_record(line, f"demo:{n}") for n, line in enumerate(lines, start=1)]
    return [r["prompt"] + r["response"] for r in found], records


def encoded(texts, response_only=True):
    corpus, records = texts
    tokenizer = build_tokenizer(corpus)
    return tokenizer, tokenize(records, tokenizer, BLOCK, "truncate", response_only)


def family_model(family, tokenizer, **changes):
    config_class, model_class, own = FAMILIES[family]
    return build_causal_lm(config_class, model_class, tokenizer, **{**own, **changes})


def test_rows_hold_whole_examples_once_each(texts):
    _, tokenized = encoded(texts)
    packed = pack(tokenized, BLOCK)
    assert len(packed.input_ids) < len(tokenized.input_ids) / 1.5  # short records: 2 or more a row
    assert all(len(row) <= BLOCK for row in packed.input_ids)
    pieces = []
    for row, labels, lengths in zip(packed.input_ids, packed.labels, packed.segments, strict=True):
        assert sum(lengths) == len(row) == len(labels)
        starts = [sum(lengths[:n]) for n in range(len(lengths))]
        assert all(labels[s] == IGNORE for s in starts)  # no example learns its neighbour's start
        pieces += [tuple(row[s : s + n]) for s, n in zip(starts, lengths, strict=True)]
    assert Counter(pieces) == Counter(map(tuple, tokenized.input_ids))
    # the first fit of the longest first: no row could have taken a later row's example
    room = min(BLOCK - len(row) for row in packed.input_ids[:-1])
    assert room < min(map(len, tokenized.input_ids))


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gemma3"])
def test_a_packed_batch_is_the_unpacked_examples_loss_and_gradient(texts, family):
    """fp32: equal within rounding. Without the position ids (attention across examples, what
    naive concatenation trains on) the same rows give another loss: the check can fail."""
    tokenizer, tokenized = encoded(texts, response_only=family != "qwen3")
    packed = pack(tokenized, BLOCK)
    # Gemma's sliding window made short enough to matter within an example
    model = family_model(family, tokenizer, **({"sliding_window": 16} if "gemma" in family else {}))
    cfg = TextTrainConfig.from_dict({"lora_rank": 4, "lora_dropout": 0.0})
    lora = add_text_lora(model, cfg)

    def loss_and_grads(data, drop=()):
        indices = list(range(len(data.input_ids)))
        batch = {k: v for k, v in text_batch(data, indices, tokenizer.pad_token_id).items()
                 if k not in drop}  # fmt: skip
        lora.zero_grad()
        loss = lora(**batch, use_cache=False,
                    num_items_in_batch=labelled_tokens(data, indices)).loss  # fmt: skip
        loss.backward()
        return loss.item(), [p.grad.clone() for p in lora.parameters() if p.requires_grad]

    assert labelled_tokens(packed, range(len(packed.input_ids))) == labelled_tokens(
        tokenized, range(len(tokenized.input_ids))
    )
    unpacked_loss, unpacked_grads = loss_and_grads(tokenized)
    packed_loss, packed_grads = loss_and_grads(packed)
    assert packed_loss == pytest.approx(unpacked_loss, rel=1e-5)
    for a, b in zip(packed_grads, unpacked_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-6)
    crossing, _ = loss_and_grads(packed, drop=("position_ids",))
    assert abs(crossing - unpacked_loss) > 1e-4 * unpacked_loss  # 10 times the tolerance


def test_packed_rows_round_trip_and_a_bad_token_file_is_named(texts, tmp_path):
    _, tokenized = encoded(texts)
    packed = pack(tokenized, BLOCK)
    write_tokens(packed, tmp_path / "train.jsonl")
    back = read_tokens(tmp_path / "train.jsonl")
    assert (back.input_ids, back.labels, back.segments) == (
        packed.input_ids, packed.labels, packed.segments,
    )  # fmt: skip
    lines = (tmp_path / "train.jsonl").read_text().splitlines()
    row = json.loads(lines[1])
    lines[1] = json.dumps(row | {"segments": row["segments"] + [1]})
    (tmp_path / "bad.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(LoramillError, match=r"bad.jsonl:2: not a token record \(segments"):
        read_tokens(tmp_path / "bad.jsonl")
