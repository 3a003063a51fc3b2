"""Text LoRA training (issue #15) on the embedded tiny LLaMA and the demo's procedures (the
train / eval split the workflow makes): it learns, a control does not, and it is
bit-reproducible on CPU."""

from __future__ import annotations

import json
import logging
import math
import random
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loramill import LoramillError
from loramill.demo.text import procedure_records
from loramill.demo.tiny_families import build_family_model
from loramill.demo.tiny_llama import build_tokenizer
from loramill.text import loop, train_config
from loramill.text.language_model import load_causal_lm, load_tokenizer
from loramill.text.loop import PROVENANCE_FILE, eval_loss, train_text_lora
from loramill.text.prepare import write_tokens
from loramill.text.records import Record, hold_out, pad_batch, parse_record, tokenize
from loramill.text.train import TextTrainConfig, train_text

TINY_LLAMA = str(Path(__file__).resolve().parents[1] / "models" / "tiny-llama")
CONFIG = {
    "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0, "learning_rate": 5e-3,
    "max_train_steps": 100, "train_batch_size": 8,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
}  # fmt: skip
DEMO = {"records": 80, "eval_fraction": 0.15, "max_seq_length": 128}  # as config/config.yaml


def base():
    return load_causal_lm(TINY_LLAMA)


@pytest.fixture(scope="module")
def setup():
    lines = [json.dumps(r) for r in procedure_records(DEMO["records"])]
    records = [parse_record(line, f"demo:{n}") for n, line in enumerate(lines, start=1)]
    train, held = hold_out(records, DEMO["eval_fraction"])
    tokenizer = load_tokenizer(TINY_LLAMA)
    encode = lambda rs: tokenize(rs, tokenizer, DEMO["max_seq_length"], "truncate", True)  # noqa: E731
    # the control: every response paired with another record's prompt
    shuffled = [r.response for r in train]
    random.Random(3).shuffle(shuffled)
    control = [Record(r.where, r.prompt, s) for r, s in zip(train, shuffled, strict=True)]
    return tokenizer, encode(train), encode(held), encode(control)


def run(setup, data, tmp_path, **changes):
    tokenizer = setup[0]
    cfg = TextTrainConfig.from_dict({**CONFIG, **changes})
    return train_text_lora(base(), data, cfg, tokenizer.pad_token_id, tmp_path)


@pytest.fixture(scope="module")
def trained(setup, tmp_path_factory):
    """CONFIG's 100 steps on the demo's training split, saved at 50 and 100, trained once:
    what the tests of learning, evaluation and export read (not train further)."""
    return run(setup, setup[1], tmp_path_factory.mktemp("trained"), save_steps=50)


def test_eval_loss_falls_and_the_shuffled_control_does_not_as_much(setup, trained, tmp_path):
    tokenizer, _, held, control = setup
    before = eval_loss(base(), held, tokenizer.pad_token_id)
    model, history, _ = trained
    after = eval_loss(model, held, tokenizer.pad_token_id)
    control_model, _, _ = run(setup, control, tmp_path / "b")
    after_control = eval_loss(control_model, held, tokenizer.pad_token_id)
    print(f"eval loss: untrained {before:.3f}, trained {after:.3f}, control {after_control:.3f}")
    assert after < 0.5 * before
    # the control learns the responses' words but not which answer a question gets
    assert after < 0.8 * after_control
    assert history[-1]["loss"] < history[0]["loss"]


def test_retraining_is_bit_identical_and_checkpoints_load_with_peft(setup, tmp_path):
    from peft import PeftModel

    tokenizer, train, held, _ = setup
    model, _, first = run(setup, train, tmp_path / "one", max_train_steps=6, save_steps=3)
    _, _, second = run(setup, train, tmp_path / "two", max_train_steps=6, save_steps=3)
    assert [p.name for p in first] == ["step-000003", "step-000006"]
    for a, b in zip(first, second, strict=True):
        one, two = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
    # the folder is what PeftModel.from_pretrained loads: same loss as the trained model
    loaded = PeftModel.from_pretrained(base(), str(first[-1]))
    pad = tokenizer.pad_token_id
    assert eval_loss(loaded, held, pad) == pytest.approx(eval_loss(model, held, pad), abs=1e-6)


def test_the_adapter_config_is_the_same_bytes_in_every_interpreter(setup, tmp_path):
    """peft writes target_modules in set order, which PYTHONHASHSEED changes. Two interpreters
    whose hash seeds put CONFIG's six modules in different set orders (1: up_proj first, 2:
    k_proj first) fail this without the sorting; each one costs seconds of imports."""
    import subprocess
    import sys

    script = (
        "import sys; from loramill.text.train import TextTrainConfig; "
        "from loramill.text.loop import add_text_lora, save_adapter; "
        "from loramill.text.language_model import load_causal_lm; "
        f"cfg = TextTrainConfig.from_dict({CONFIG!r}); "
        f"save_adapter(add_text_lora(load_causal_lm({TINY_LLAMA!r}), cfg), sys.argv[1])"
    )
    configs = set()
    for seed in ("1", "2"):
        out = tmp_path / seed
        subprocess.run([sys.executable, "-c", script, str(out)], check=True,
                       env={**__import__("os").environ, "PYTHONHASHSEED": seed})  # fmt: skip
        configs.add((out / "adapter_config.json").read_bytes())
    assert len(configs) == 1


def test_bad_options_name_the_key(setup, tmp_path):
    with pytest.raises(LoramillError, match=r"train\.rank: not a text training option"):
        TextTrainConfig.from_dict({"rank": 8})
    with pytest.raises(LoramillError, match=r"train\.target_modules: .*attn_qkv"):
        run(setup, setup[1], tmp_path, target_modules=["attn_qkv"])


def test_gradient_checkpointing_and_bf16(setup, tmp_path):
    _, train, _, _ = setup
    _, plain, _ = run(setup, train, tmp_path / "p", max_train_steps=5)
    model, recomputed, _ = run(setup, train, tmp_path / "g", max_train_steps=5,
                               gradient_checkpointing=True)  # fmt: skip
    assert model.get_base_model().is_gradient_checkpointing
    assert [r["loss"] for r in recomputed] == pytest.approx([r["loss"] for r in plain], abs=1e-5)
    _, half, written = run(setup, train, tmp_path / "h", max_train_steps=20,
                           mixed_precision="bf16")  # fmt: skip
    assert half[-1]["loss"] < 0.5 * half[0]["loss"]
    tensors = load_file(str(written[-1] / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # LoRA weights stay float32
    with pytest.raises(LoramillError, match=r"train\.mixed_precision: 'fp8': use no or bf16"):
        TextTrainConfig.from_dict({"mixed_precision": "fp8"})


def test_bf16_stores_the_frozen_linears_rounded_for_the_same_bits(setup, tmp_path, monkeypatch):
    """Under bf16 autocast the frozen Linear weights are stored in bf16 (once, not rounded at
    every forward): the adapter is the one autocast alone trains, to the bit. Weights tied to
    the embeddings (Gemma) and the LoRA's own stay float32."""
    _, train, _, _ = setup
    options = {"max_train_steps": 4, "mixed_precision": "bf16"}
    model, _, stored = run(setup, train, tmp_path / "stored", **options)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert layer.base_layer.weight.dtype == torch.bfloat16
    assert layer.lora_A["default"].weight.dtype == torch.float32
    store = loop.frozen_linears_in_bf16
    monkeypatch.setattr(loop, "frozen_linears_in_bf16", lambda model: 0)
    _, _, cast = run(setup, train, tmp_path / "cast", **options)
    one, two = adapter(stored), adapter(cast)
    assert all(torch.equal(one[k], two[k]) for k in one)
    tokenizer = build_tokenizer(["a tied model"])
    gemma = build_family_model("gemma2", tokenizer)
    lora = loop.add_text_lora(gemma, TextTrainConfig.from_dict({"target_modules": ["q_proj"]}))
    assert store(lora) == 2 * 7  # q (under its LoRA), k, v, o, gate, up, down
    assert gemma.lm_head.weight is gemma.model.embed_tokens.weight
    assert gemma.lm_head.weight.dtype == torch.float32


def quantized_run(setup, out, **changes):
    """A short run of the text_train stage, on the base loaded as ``changes`` say."""
    out.mkdir(parents=True)
    write_tokens(setup[1], out / "train.jsonl")
    config = {**CONFIG, "max_train_steps": 5, **changes}
    return train_text(str(out / "train.jsonl"), str(out / "adapters"), str(out / "loss.png"),
                      TINY_LLAMA, config, device="cpu")  # fmt: skip


def adapter(written):
    return load_file(str(written[-1] / "adapter_model.safetensors"))


def test_qlora_trains_a_float32_adapter_on_a_quantized_base(
    setup, tmp_path, bitsandbytes, caplog, monkeypatch
):
    """load_in_4bit (NF4, double-quantized) and load_in_8bit (issue #33): bitsandbytes quantizes
    the base's Linear weights as they load, the LoRA trains on top in float32, reproducibly,
    and the base's rounding shows in the adapter. The stage refuses QLoRA on the CPU; here
    bitsandbytes' CPU kernels stand in for CUDA's, through the same code."""
    monkeypatch.setattr(train_config, "QLORA_DEVICES", ("cuda", "cpu"))
    caplog.set_level(logging.INFO, logger="loramill.text")
    plain = adapter(run(setup, setup[1], tmp_path / "plain", max_train_steps=5)[2])
    for key in ("load_in_4bit", "load_in_8bit"):
        written = quantized_run(setup, tmp_path / key, **{key: True})
        tensors = adapter(written)
        again = adapter(quantized_run(setup, tmp_path / f"{key}-again", **{key: True}))
        assert tensors.keys() == plain.keys()
        assert {t.dtype for t in tensors.values()} == {torch.float32}
        assert all(torch.equal(tensors[k], again[k]) for k in tensors)
        assert any(not torch.equal(tensors[k], plain[k]) for k in tensors)
        assert all(t.abs().sum() > 0 for k, t in tensors.items() if "lora_B" in k)  # trained
        # the tiny LLaMA's 2 blocks of 7 Linear layers; lm_head stays unquantized
        assert f"{key}: 14 Linear weights quantized" in caplog.text
        provenance = json.loads((written[-1] / PROVENANCE_FILE).read_text())
        assert provenance["versions"] == {"bitsandbytes": version("bitsandbytes")}


def test_qlora_is_refused_on_the_cpu_in_one_line_naming_the_alternative(setup, tmp_path):
    """Issue #33: QLoRA is for a GPU's memory; on the CPU the stage stops before loading
    anything, in one line that names the device and bf16 LoRA. An image run's
    train.quantize_base is not this option, and still runs on the CPU (test_quantize)."""
    for key in ("load_in_4bit", "load_in_8bit"):
        with pytest.raises(LoramillError) as refused:
            quantized_run(setup, tmp_path / key, **{key: True})
        assert str(refused.value) == (
            f"train.{key}: QLoRA needs a CUDA GPU and this job's device is 'cpu'; "
            f"train a bf16 LoRA instead (drop {key}, set mixed_precision: bf16)"
        )
        assert not (tmp_path / key / "adapters").exists()


def test_qlora_options_name_their_key(setup, tmp_path, bitsandbytes, monkeypatch):
    with pytest.raises(LoramillError, match=r"^train\.load_in_4bit and train\.load_in_8bit: "):
        TextTrainConfig.from_dict({"load_in_4bit": True, "load_in_8bit": True})
    with pytest.raises(LoramillError, match=r"^train\.load_in_4bit/load_in_8bit: .*unquantized"):
        run(setup, setup[1], tmp_path, max_train_steps=1, load_in_4bit=True)
    eight = {"load_in_8bit": True}
    with pytest.raises(LoramillError, match=r"^train\.load_in_8bit: the device 'mps' has no "):
        load_causal_lm(TINY_LLAMA, quantization=eight, device="mps")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # not installed
    with pytest.raises(LoramillError, match=r"^train\.load_in_8bit: needs bitsandbytes, "):
        load_causal_lm(TINY_LLAMA, quantization=eight)


def test_a_stopped_run_resumes_exactly(setup, tmp_path, caplog):
    _, train, _, _ = setup
    state = tmp_path / "state"  # a run stopped after step 3, then one asked for 6
    first = run_with_state(setup, train, tmp_path / "first", state, max_train_steps=3)
    with caplog.at_level("INFO", logger="loramill"):
        _, history, resumed = run_with_state(setup, train, tmp_path / "b", state, max_train_steps=6)
    assert "resumed from step 3" in caplog.messages
    _, whole, straight = run(setup, train, tmp_path / "c", max_train_steps=6, save_steps=3,
                             lora_dropout=0.1)  # fmt: skip
    assert [r["loss"] for r in history] == [r["loss"] for r in whole]
    assert [p.name for p in resumed] == [p.name for p in straight] == ["step-000003", "step-000006"]
    for a, b in zip(resumed, straight, strict=True):
        one, two = (load_file(str(p / "adapter_model.safetensors")) for p in (a, b))
        assert all(torch.equal(one[k], two[k]) for k in one)
    assert first[2][0].name == "step-000003"


def run_with_state(setup, data, out, state, **changes):
    tokenizer = setup[0]
    cfg = TextTrainConfig.from_dict({**CONFIG, "save_steps": 3, "lora_dropout": 0.1, **changes})
    return train_text_lora(base(), data, cfg, tokenizer.pad_token_id,
                           out, state_dir=state)  # fmt: skip


def test_evaluation_per_checkpoint_with_the_adapter_off_and_on(setup, trained):
    from loramill.text.evaluate import evaluate, markdown

    tokenizer, _, held, _ = setup
    _, _, written = trained
    prompts = [procedure_records(80)[n]["prompt"] for n in (0, 1)]
    rows = evaluate(base(), tokenizer, written[::-1], held, prompts, max_new_tokens=40)
    assert [(r["step"], r["strength"]) for r in rows] == [(0, 0), (50, 1), (100, 1)]
    assert rows[0]["eval_loss"] == pytest.approx(eval_loss(base(), held, tokenizer.pad_token_id))
    assert rows[-1]["eval_loss"] < 0.5 * rows[0]["eval_loss"]
    assert rows[-1]["perplexity"] == pytest.approx(math.exp(rows[-1]["eval_loss"]))
    # off: the base model's babble; on: the learned answer to its question (the isolation its
    # unit's kind needs, its task's steps; unit numbers are still hit and miss)
    answers = [procedure_records(80)[n]["response"] for n in (0, 1)]
    for generation, answer in zip(rows[-1]["generations"], answers, strict=True):
        assert generation.startswith(answer.split(" Sign the")[0]), (generation, answer)
    assert all(not text.startswith("First ") for text in rows[0]["generations"])
    table = markdown(rows, prompts)
    assert "| step 100 | " in table and "| base (adapter off) | " in table
    assert "**### Question:<br>How do I" in table
    assert "| step 100 | First " in table


def test_exports_reload_with_the_trained_models_logits(setup, trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loramill.text.export import PROVENANCE_FILE, export_adapter_folder, export_merged

    tokenizer, _, held, _ = setup
    model, _, written = trained
    batch = pad_batch(held.input_ids[:4], held.labels[:4], tokenizer.pad_token_id)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits

        folder = export_adapter_folder(written[-1], tmp_path / "adapter", {"seed": 0})
        assert json.loads((folder / PROVENANCE_FILE).read_text()) == {"seed": 0}
        loaded = PeftModel.from_pretrained(base(), str(folder)).eval()
        assert torch.equal(loaded(**inputs).logits, want)

        merged_dir = export_merged(base(), tokenizer, written[-1],
                                   tmp_path / "merged")  # fmt: skip
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
        assert not any("lora" in k for k in merged.state_dict())
        assert torch.allclose(merged(**inputs).logits, want, atol=1e-4)
        reloaded = AutoTokenizer.from_pretrained(merged_dir)
        assert reloaded("pump 7")["input_ids"] == tokenizer("pump 7")["input_ids"]
    with pytest.raises(LoramillError, match="not a peft adapter folder"):
        export_adapter_folder(tmp_path, tmp_path / "nothing", {})
