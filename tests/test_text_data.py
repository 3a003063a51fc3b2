"""Text datasets (issue #15): records checked with file:line, rendered, tokenized, split."""

from __future__ import annotations

import json

import pytest

from loramill import LoramillError
from loramill.demo.tiny_llama import build_model, build_tokenizer
from loramill.text.records import (
    IGNORE,
    Record,
    hold_out,
    pad_batch,
    read_records,
    render,
    tokenize,
)

CORPUS = [
    "### Question:\nHow do I reset the pump?\n\n### Response:\nClose valve A, then hold RESET.",
    "The station's maintenance log lists every inspection of the pumps and valves.",
    "Customer asked about delivery times; the answer is two to three working days.",
] * 4


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(CORPUS)


def write(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line)
                              for line in lines) + "\n")  # fmt: skip
    return path


def test_the_three_record_kinds_and_blank_lines(tmp_path):
    path = write(tmp_path / "train.jsonl", [
        {"text": "a whole document"},
        "",
        {"prompt": "Q?", "response": "A."},
        {"messages": [{"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
    ])  # fmt: skip
    text, pair, chat = read_records(path)
    assert (text.prompt, text.response) == ("", "a whole document")
    assert (pair.prompt, pair.response, pair.where) == ("Q?", "A.", f"{path}:3")
    assert chat.messages == (("user", "hi"), ("assistant", "hello"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "ok"', r"train\.jsonl:2: not JSON"),
        ('["text"]', r"train\.jsonl:2: a record must be a JSON object"),
        ('{"prompt": "q"}', r"train\.jsonl:2: 'prompt' without 'response'"),
        ('{"text": "a", "prompt": "b", "response": "c"}', r":2: a record has exactly one of"),
        ('{"text": "a", "source": "web"}', r":2: unknown field 'source' beside text"),
        ('{"text": "  "}', r":2: 'text' must be a non-empty string"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', r":2: messages\[0\] role 'bot'"),
        ('{"messages": [{"role": "user", "content": "x"}]}', r":2: the last message must be"),
    ],
)
def test_a_bad_record_is_named_by_file_and_line(tmp_path, line, message):
    path = write(tmp_path / "train.jsonl", [{"text": "fine"}, line])
    with pytest.raises(LoramillError, match=message):
        read_records(path)


def test_prompt_tokens_carry_no_loss_when_asked(tokenizer):
    record = Record("t:1", "How do I reset the pump?", "Close valve A.")
    masked = tokenize([record], tokenizer, 256, "truncate", response_only=True)
    full = tokenize([record], tokenizer, 256, "truncate", response_only=False)
    ids, labels = masked.input_ids[0], masked.labels[0]
    prompt_len = len(tokenizer(record.prompt)["input_ids"])  # BOS included
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert labels[:prompt_len] == [IGNORE] * prompt_len
    assert labels[prompt_len:] == ids[prompt_len:]
    assert full.labels[0] == full.input_ids[0] == ids
    assert tokenizer.decode(ids[prompt_len:-1]) == record.response


def test_chat_records_split_at_the_assistants_answer(tokenizer):
    record = Record("t:1", messages=(("user", "reset?"), ("assistant", "Hold RESET.")))
    prompt, response = render(record, tokenizer)
    assert prompt.endswith("### Assistant:\n") and "reset?" in prompt
    assert response.startswith("Hold RESET.")
    tokenizer_without = build_tokenizer(CORPUS)
    tokenizer_without.chat_template = None
    with pytest.raises(LoramillError, match=r"t:1: 'messages' needs a tokenizer with a chat"):
        render(record, tokenizer_without)


def test_long_records_are_truncated_or_dropped_and_counted(tokenizer):
    short = Record("t:1", "Q", "short answer")
    long = Record("t:2", "Q", " ".join(["valve"] * 200))
    cut = tokenize([short, long], tokenizer, 32, "truncate", response_only=True)
    assert (cut.truncated, cut.dropped, len(cut.input_ids)) == (1, 0, 2)
    assert max(len(row) for row in cut.input_ids) == 32
    dropped = tokenize([short, long], tokenizer, 32, "drop", response_only=True)
    assert (dropped.truncated, dropped.dropped, len(dropped.input_ids)) == (0, 1, 1)
    # a prompt that fills the window leaves nothing to learn: dropped, not trained on
    prompt_only = tokenize([Record("t:3", " ".join(["q"] * 100), "a")], tokenizer, 16, "truncate",
                           response_only=True)  # fmt: skip
    assert (prompt_only.dropped, prompt_only.input_ids) == (1, [])


def test_hold_out_is_decided_by_content_not_position():
    records = [Record(f"t:{n}", response=f"record number {n}") for n in range(200)]
    train, held = hold_out(records, 0.1)
    assert 5 < len(held) < 40 and len(train) + len(held) == 200
    shuffled = [*records[::-1], Record("t:new", response="one more")]
    _, held2 = hold_out(shuffled, 0.1)
    assert {r.response for r in held} <= {r.response for r in held2}
    with pytest.raises(LoramillError, match="leaves 0 of 1 records for evaluation"):
        hold_out(records[:1], 0.01)


def test_padding(tokenizer):
    records = [Record("t:1", "Q", "a"), Record("t:2", "Q", "a much longer answer here")]
    tokenized = tokenize(records, tokenizer, 64, "truncate", response_only=True)
    batch = pad_batch(tokenized.input_ids, tokenized.labels, tokenizer.pad_token_id)
    first = len(tokenized.input_ids[0])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["attention_mask"][0].tolist() == [1] * first + [0] * (
        batch["input_ids"].shape[1] - first
    )
    assert (batch["labels"][0, first:] == IGNORE).all()


def test_tokenizer_and_model_are_deterministic(tokenizer):
    again = build_tokenizer(CORPUS)
    assert again.backend_tokenizer.to_str() == tokenizer.backend_tokenizer.to_str()
    text = "Close valve A, then hold RESET. ünïcödé ✓"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    one, two = build_model(tokenizer, seed=3), build_model(again, seed=3)
    assert all(
        (a == b).all()
        for a, b in zip(one.state_dict().values(), two.state_dict().values(), strict=True)
    )
    assert one.config.vocab_size == len(tokenizer)
