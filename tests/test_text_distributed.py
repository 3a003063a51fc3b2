"""text.train.num_processes (issue #33): data-parallel text training through the image
training's launcher (torchrun's agent, gloo on this CPU). Two processes of batch 1 train what
one process of batch 2 does, and a run continued from its saved state is the unbroken run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramill.demo.text import procedure_records
from loramill.text.language_model import load_tokenizer
from loramill.text.prepare import write_tokens
from loramill.text.records import pack, parse_record, tokenize
from loramill.text.train import train_text

TINY_LLAMA = str(Path(__file__).resolve().parents[1] / "models" / "tiny-llama")
CONFIG = {"lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0, "learning_rate": 5e-3,
          "target_modules": ["q_proj", "v_proj"], "threads": 1}  # fmt: skip


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """The demo's records, packed: the workers take rows of several examples each."""
    lines = [json.dumps(r) for r in procedure_records(24)]
    records = [parse_record(line, f"demo:{n}") for n, line in enumerate(lines, start=1)]
    tokenized = tokenize(records, load_tokenizer(TINY_LLAMA), 96, "truncate", True)
    path = tmp_path_factory.mktemp("tokens") / "train.jsonl"
    write_tokens(pack(tokenized, 96), path)
    return path


def trained(tokens, folder, state_dir=None, **options):
    written = train_text(str(tokens), str(folder / "adapters"), str(folder / "loss.png"),
                         TINY_LLAMA, {**CONFIG, **options}, device="cpu",
                         state_dir=state_dir)  # fmt: skip
    assert [p.name for p in written][-1] == f"step-{options['max_train_steps']:06d}"
    return load_file(written[-1] / "adapter_model.safetensors")


def test_two_processes_of_batch_one_train_what_one_process_of_batch_two_does(tokens, tmp_path):
    steps = {"max_train_steps": 4, "save_steps": 2}
    one = trained(tokens, tmp_path / "one", train_batch_size=2, **steps)
    two = trained(tokens, tmp_path / "two", train_batch_size=1, num_processes=2, **steps)
    alone = trained(tokens, tmp_path / "alone", train_batch_size=1, **steps)  # half the batch
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(two[key], one[key], rtol=1e-4, atol=1e-6), key
    assert any(not torch.allclose(alone[k], one[k], rtol=1e-2, atol=1e-4) for k in one)
    assert (tmp_path / "two" / "loss.png").exists()


def test_a_continued_two_process_run_is_the_unbroken_run(tokens, tmp_path):
    """With dropout on: each step draws afresh from its own seed, so nothing of the random
    state needs carrying over."""
    options = {"train_batch_size": 1, "num_processes": 2, "lora_dropout": 0.1, "save_steps": 2}
    state = tmp_path / "state"
    trained(tokens, tmp_path / "first", state, max_train_steps=2, **options)
    continued = trained(tokens, tmp_path / "continued", state, max_train_steps=4, **options)
    unbroken = trained(tokens, tmp_path / "unbroken", max_train_steps=4, **options)
    assert all(torch.equal(continued[k], unbroken[k]) for k in unbroken)
    assert (tmp_path / "continued" / "adapters" / "step-000002").is_dir()  # from the state
