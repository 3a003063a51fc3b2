"""The text loss (issue #28): the output head projects only the positions that predict a
label, and the loss is transformers' own, in every family (Gemma's final soft-capping too),
on padded and on packed batches."""

from __future__ import annotations

import json

import pytest
import torch

from loramill.demo.text import procedure_records
from loramill.demo.tiny_families import FAMILIES, build_family_model
from loramill.demo.tiny_llama import build_tokenizer
from loramill.text.loop import add_text_lora, labelled_tokens, summed_loss, text_batch
from loramill.text.records import pack, parse_record, tokenize
from loramill.text.train import TextTrainConfig


@pytest.fixture(scope="module")
def examples():
    found = procedure_records(12)
    records = [parse_record(json.dumps(r), f"demo:{n}") for n, r in enumerate(found, start=1)]
    tokenizer = build_tokenizer([r["prompt"] + r["response"] for r in found])
    return tokenizer, tokenize(records, tokenizer, 128, "truncate", response_only=True)


def projected_rows(model):
    """A list that gains, at each forward, the rows the output head projects."""
    rows = []
    model.get_output_embeddings().register_forward_pre_hook(
        lambda _, args: rows.append(args[0].shape[:-1].numel())
    )
    return rows


def loss_and_grads(lora, compute):
    """``compute()``'s loss, backpropagated, and the LoRA's gradients."""
    lora.zero_grad()
    loss = compute()
    loss.backward()
    return loss.item(), [p.grad.clone() for p in lora.parameters() if p.requires_grad]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_loss_is_transformers_own_with_the_head_on_labelled_positions_only(examples, family):
    tokenizer, tokenized = examples
    model = build_family_model(family, tokenizer)
    lora = add_text_lora(model, TextTrainConfig.from_dict({"lora_rank": 4, "lora_dropout": 0.0}))
    rows = projected_rows(model)
    for data in (tokenized, pack(tokenized, 128)):
        indices = list(range(len(data.input_ids)))
        batch = text_batch(data, indices, tokenizer.pad_token_id)
        labelled = labelled_tokens(data, indices)
        full, full_grads = loss_and_grads(
            lora,
            lambda: lora(**batch, use_cache=False, num_items_in_batch=labelled).loss,  # noqa: B023
        )
        assert rows[-1] == batch["input_ids"].numel()  # transformers projects every position
        ours, grads = loss_and_grads(lora, lambda: summed_loss(lora, batch) / labelled)  # noqa: B023
        assert rows[-1] == labelled < batch["input_ids"].numel() * 0.75  # prompts and padding
        assert ours == pytest.approx(full, rel=1e-6)
        for a, b in zip(grads, full_grads, strict=True):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
