"""The language-model families users fine-tune (issue #33), each on a tiny model of its own
architecture built offline (loramill.demo.tiny_families): the default LoRA targets train and
the eval loss falls, retraining is bit-identical, and where llama.cpp has the architecture the
GGUF adapter loads there and moves logits as peft does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from loramill import LoramillError
from loramill.demo.text import procedure_records
from loramill.demo.tiny_families import FAMILIES, write_family_model
from loramill.text.gguf import ARCHITECTURES, architecture, export_gguf_lora, write_base_gguf
from loramill.text.language_model import load_causal_lm, load_tokenizer, model_config
from loramill.text.loop import eval_loss, train_text_lora
from loramill.text.records import hold_out, parse_record, tokenize
from loramill.text.train import TextTrainConfig

pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dev dependency")
from test_text_gguf import llama_logits

# the families whose architecture llama.cpp loads a GGUF LoRA of (loramill.text.gguf)
GGUF_FAMILIES = [f for f, (_, model, _) in FAMILIES.items() if model in ARCHITECTURES]
# the schema's default targets (q_proj, v_proj): what a user who sets none trains
CONFIG = {"lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 1e-2,
          "max_train_steps": 40, "save_steps": 40, "train_batch_size": 8}  # fmt: skip


@pytest.fixture(scope="module")
def records():
    found = procedure_records(80)
    lines = [json.dumps(r) for r in found]
    parsed = [parse_record(line, f"demo:{n}") for n, line in enumerate(lines, start=1)]
    return [r["prompt"] + r["response"] for r in found], *hold_out(parsed, 0.15)


def trained(family, records, folder):
    texts, train, held = records
    model_dir = write_family_model(family, folder / "base", texts)
    tokenizer = load_tokenizer(str(model_dir))
    encode = lambda rs: tokenize(rs, tokenizer, 128, "truncate", True)  # noqa: E731
    cfg = TextTrainConfig.from_dict(CONFIG)
    base = load_causal_lm(str(model_dir))
    before = eval_loss(base, encode(held), tokenizer.pad_token_id)
    model, _, written = train_text_lora(load_causal_lm(str(model_dir)), encode(train), cfg,
                                        tokenizer.pad_token_id, folder / "c")  # fmt: skip
    after = eval_loss(model, encode(held), tokenizer.pad_token_id)
    return model_dir, tokenizer, written[-1], before, after


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_learns_with_the_default_targets_bit_identically(family, records, tmp_path):
    _, _, adapter, before, after = trained(family, records, tmp_path / "one")
    _, _, again, _, _ = trained(family, records, tmp_path / "two")
    assert after < 0.8 * before, (before, after)
    one, two = (load_file(str(p / "adapter_model.safetensors")) for p in (adapter, again))
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    assert {k.split(".")[-3] for k in one} == {"q_proj", "v_proj"}


@pytest.mark.parametrize("family", sorted(GGUF_FAMILIES))
def test_the_gguf_adapter_of_each_family_llama_cpp_has_matches_peft(family, records, tmp_path):
    from peft import PeftModel

    model_dir, tokenizer, adapter, _, _ = trained(family, records, tmp_path)
    config = model_config(str(model_dir))
    base_gguf = write_base_gguf(model_dir, tmp_path / "base.gguf")
    lora = export_gguf_lora(adapter, config, tmp_path / "a.gguf", family)
    ids = tokenizer(records[2][0].prompt)["input_ids"]
    with torch.no_grad():
        want_base = load_causal_lm(str(model_dir))(torch.tensor([ids])).logits[0].numpy()
        peft = PeftModel.from_pretrained(load_causal_lm(str(model_dir)), str(adapter)).eval()
        want_lora = peft(torch.tensor([ids])).logits[0].numpy()
    got_base, got_lora = llama_logits(base_gguf, ids), llama_logits(base_gguf, ids, lora)
    assert np.abs(want_lora - want_base).max() > 1  # the adapter moves logits
    assert np.abs(got_base - want_base).max() < 0.05
    assert np.abs(got_lora - want_lora).max() < 0.05


def test_every_family_has_a_gguf_adapter_and_another_architecture_is_refused():
    assert sorted(GGUF_FAMILIES) == sorted(FAMILIES)
    with pytest.raises(LoramillError, match=r"no GGUF LoRA for Phi3ForCausalLM.*set gguf: false"):
        architecture({"architectures": ["Phi3ForCausalLM"]})
