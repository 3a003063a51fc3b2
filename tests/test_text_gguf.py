"""GGUF exports for llama.cpp (issue #15): the embedded base converted, a trained adapter
exported, both loaded by llama.cpp itself (llama-cpp-python) and compared with transformers /
peft on the same tokens."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from test_text_train import CONFIG, TINY_LLAMA, base, run, setup  # noqa: F401

from loramill import LoramillError
from loramill.demo.text import procedure_records
from loramill.text.gguf import architecture, export_gguf_lora, write_base_gguf
from loramill.text.language_model import model_config

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a dev dependency")
PROMPT = procedure_records(80)[0]["prompt"]


def llama_logits(model_gguf, ids, lora=None) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids``."""
    options = {"lora_path": str(lora)} if lora else {}
    llm = llama_cpp.Llama(str(model_gguf), logits_all=True, n_ctx=128, n_threads=2, seed=0,
                          verbose=False, **options)  # fmt: skip
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)])


def test_the_gguf_adapter_loads_in_llama_cpp_and_matches_peft(setup, tmp_path):  # noqa: F811
    from peft import PeftModel

    tokenizer, train, _, _ = setup
    _, _, written = run(setup, train, tmp_path / "t", max_train_steps=30)
    model_gguf = write_base_gguf(TINY_LLAMA, tmp_path / "base.gguf")
    lora = export_gguf_lora(written[-1], model_config(TINY_LLAMA), tmp_path / "a.gguf", "demo",
                            {"step": 30})  # fmt: skip
    fields = gguf.GGUFReader(lora).fields
    assert json.loads(fields["loramill.provenance"].contents()) == {"step": 30}
    assert fields["adapter.type"].contents() == "lora"
    ids = tokenizer(PROMPT)["input_ids"]
    with torch.no_grad():
        want_base = base()(torch.tensor([ids])).logits[0].numpy()
        adapted = PeftModel.from_pretrained(base(), str(written[-1])).eval()
        want_lora = adapted(torch.tensor([ids])).logits[0].numpy()
    got_base = llama_logits(model_gguf, ids)
    got_lora = llama_logits(model_gguf, ids, lora)
    # the adapter moves logits by several units; llama.cpp and torch agree to ~1e-2
    assert np.abs(want_lora - want_base).max() > 2
    assert np.abs(got_base - want_base).max() < 0.05
    assert np.abs(got_lora - want_lora).max() < 0.05
    # and it changes what llama.cpp writes: greedy continuations differ
    assert got_lora[-1].argmax() == want_lora[-1].argmax() != got_base[-1].argmax()


def test_gguf_refuses_what_it_cannot_express(tmp_path):
    with pytest.raises(LoramillError, match=r"text\.export\.gguf: no GGUF LoRA for GPT2LMHead"):
        architecture({"architectures": ["GPT2LMHeadModel"]})
    folder = tmp_path / "dora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"use_dora": True, "lora_alpha": 8}))
    with pytest.raises(LoramillError, match="DoRA"):
        export_gguf_lora(folder, model_config(TINY_LLAMA), tmp_path / "x.gguf", "x")
