"""The base model of a text dataset (issue #15): the committed embedded model is what its
builder makes, it is fingerprinted by what the loader reads, and bad folders are named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import digest

from loramill import LoramillError
from loramill.hashing import HashCache
from loramill.model_files import (
    language_model_files,
    language_model_fingerprint,
    resolve_language_model,
)
from loramill.text.language_model import load_causal_lm
from loramill.text.prepare import prepare_text, read_tokens

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO / "models" / "tiny-llama"
PREPARE = {"max_seq_length": 128, "overflow": "truncate", "response_only": True,
           "packing": False, "eval_fraction": 0.15}  # fmt: skip


def test_the_committed_tiny_llama_is_what_its_builder_makes(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "builder", REPO / "models" / "build_tiny_llama.py"
    )
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    built = builder.build(tmp_path / "tiny-llama")
    for name in language_model_files(TINY_LLAMA):
        assert digest(built / name) == digest(TINY_LLAMA / name), name


def test_fingerprint_follows_what_loads_and_nothing_else(tmp_path):
    model = shutil.copytree(TINY_LLAMA, tmp_path / "m")
    hashes = HashCache(tmp_path / "hashes.db")
    before = language_model_fingerprint(str(model), hashes)
    (model / "README.md").write_text("notes\n")
    (model / ".git").mkdir()
    (model / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (model / "pytorch_model.bin").write_bytes(b"pickle, never read without the opt-in")
    assert language_model_fingerprint(str(model), HashCache(tmp_path / "h2.db")) == before
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert language_model_fingerprint(str(model), HashCache(tmp_path / "h3.db")) != before


def test_bad_base_models_are_named(tmp_path):
    with pytest.raises(LoramillError, match=r"base_model '.*tiny-sd': not a transformers model"):
        resolve_language_model(str(REPO / "models" / "tiny-sd"))
    folder = shutil.copytree(TINY_LLAMA, tmp_path / "m")
    (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(LoramillError, match="names no \\*ForCausalLM architecture"):
        resolve_language_model(str(folder))
    assert resolve_language_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"
    (folder / "config.json").write_bytes((TINY_LLAMA / "config.json").read_bytes())
    (folder / "model.safetensors").unlink()
    with pytest.raises(LoramillError, match=r"base_model '.*': cannot load"):
        load_causal_lm(str(folder))


def records(path: Path, count: int, start: int = 0) -> Path:
    from loramill.demo.text import procedure_records, write_jsonl

    return write_jsonl(procedure_records(80)[start : start + count], path)


def test_prepare_holds_out_by_content_or_uses_eval_jsonl(tmp_path, caplog):
    train = records(tmp_path / "train.jsonl", 60)
    outs = [str(tmp_path / n) for n in ("train.tok", "eval.tok", "summary.json")]
    with caplog.at_level("INFO", logger="loramill"):
        summary = prepare_text(str(train), [], *outs, PREPARE, str(TINY_LLAMA))
    assert summary["train"]["records"] + summary["eval"]["records"] == 60
    assert f"{train}: {summary['train']['examples']} examples, 0 truncated, 0 dropped" in (
        caplog.messages
    )
    held = {tuple(ids) for ids in read_tokens(outs[1]).input_ids}
    # one more record moves none between the splits
    records(tmp_path / "train.jsonl", 61)
    prepare_text(str(train), [], *outs, PREPARE, str(TINY_LLAMA))
    assert held <= {tuple(ids) for ids in read_tokens(outs[1]).input_ids}

    own = records(tmp_path / "eval.jsonl", 5, start=70)
    summary = prepare_text(str(train), [str(own)], *outs, PREPARE, str(TINY_LLAMA))
    assert (summary["train"]["records"], summary["eval"]["records"]) == (61, 5)

    short = {**PREPARE, "max_seq_length": 40, "overflow": "drop"}
    with pytest.raises(LoramillError, match="no train examples left"):
        prepare_text(str(train), [str(own)], *outs, short, str(TINY_LLAMA))
