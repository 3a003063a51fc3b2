"""The text_export stage: one folder, ``exports/<ds>/``, per text adapter:

adapter_model.safetensors, adapter_config.json   the peft adapter of the last checkpoint
                                                 (``PeftModel.from_pretrained(base, folder)``)
loramill_provenance.json                         how it was made: base model, data, config,
                                                 the train stage's fingerprint, software
README.md                                        model card: how to load it, settings
<ds>.gguf                                        llama.cpp LoRA adapter (text.export.gguf)
merged/                                          base + adapter, a plain transformers model
                                                 (text.export.merged)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.files import atomic_folder, write_json, write_text
from loramill.hashing import hash_file
from loramill.models.checkpoint import STEP_PREFIX, step_of
from loramill.text.gguf import export_gguf_lora
from loramill.text.language_model import (
    load_causal_lm,
    load_tokenizer,
    model_config,
    quantizing_option,
)
from loramill.text.loop import PROVENANCE_FILE

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")


def checkpoint_folders(checkpoints_dir: str | os.PathLike) -> list[Path]:
    """The ``step-NNNNNN`` adapter folders of a training run, in step order."""
    found = sorted(Path(checkpoints_dir).glob(f"{STEP_PREFIX}*"), key=lambda p: p.name)
    folders = [p for p in found if (p / ADAPTER_FILES[0]).is_file()]
    if not folders:
        raise LoramillError(f"{checkpoints_dir}: no adapter checkpoints")
    return folders


def copy_adapter(source: Path, dest: Path) -> None:
    missing = [name for name in ADAPTER_FILES if not (source / name).is_file()]
    if missing:
        raise LoramillError(f"{source}: not a peft adapter folder (no {missing[0]})")
    for name in ADAPTER_FILES:
        shutil.copyfile(source / name, dest / name)


def export_adapter_folder(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, provenance: dict[str, Any]
) -> Path:
    """Copy a checkpoint's adapter folder to ``out_dir`` with its provenance beside it."""
    with atomic_folder(out_dir) as tmp:
        copy_adapter(Path(checkpoint), tmp)
        write_json(tmp / PROVENANCE_FILE, provenance)
    return Path(out_dir)


def export_merged(
    base: Any, tokenizer: Any, checkpoint: str | os.PathLike, out_dir: str | os.PathLike
) -> Path:
    """The base with the adapter's weights added in (``merge_and_unload``), saved with its
    tokenizer as safetensors."""
    from peft import PeftModel

    merged = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload()
    with atomic_folder(out_dir) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)


def model_card(name: str, provenance: dict[str, Any], gguf: bool, merged: bool) -> str:
    cfg, base = provenance.get("train_config", {}), provenance.get("base_model", "")
    lines = [
        f"# {name}", "",
        f"A LoRA adapter for `{base}`, trained by loramill at step {provenance['step']}.", "",
        "## Use", "", "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
        f'base = AutoModelForCausalLM.from_pretrained("{base}")',
        f'model = PeftModel.from_pretrained(base, "exports/{name}")',
        "```", "",
    ]  # fmt: skip
    if gguf:
        lines += [f"llama.cpp: `llama-cli -m BASE.gguf --lora exports/{name}/{name}.gguf`", ""]
    if merged:
        lines += [f"Merged model (no peft needed): `exports/{name}/merged/`.", ""]
    if quantized := quantizing_option(cfg):
        lines += [f"Trained on the base quantized by bitsandbytes as it loaded (`{quantized}`, "
                  "QLoRA); the adapter loads on the unquantized base as above.", ""]  # fmt: skip
    lines += ["## Training", "", "| option | value |", "| --- | --- |"]
    lines += [f"| {key} | {json.dumps(value)} |" for key, value in sorted(cfg.items())]
    lines += [
        "", f"Examples: {provenance.get('examples')}, tokens: {provenance.get('tokens')}.",
        f"Adapter sha256: `{provenance['adapter_sha256']}`; the train stage's fingerprint: "
        f"`{provenance.get('stage', {}).get('fingerprint', '')}`.",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def export_text(
    checkpoints_dir: str, out_dir: str, name: str, language_model: str,
    settings: dict[str, Any], allow_unsafe_weights: bool = False,
) -> Path:  # fmt: skip
    """The text_export stage: the last checkpoint as ``out_dir`` (see the module doc)."""

    last = checkpoint_folders(checkpoints_dir)[-1]
    provenance = json.loads((last / PROVENANCE_FILE).read_text(encoding="utf-8"))
    provenance.update(
        name=name,
        step=step_of(last.name),
        adapter_sha256=hash_file(last / ADAPTER_FILES[0]),
        export=settings,
    )
    with atomic_folder(out_dir) as tmp:
        copy_adapter(last, tmp)
        write_json(tmp / PROVENANCE_FILE, provenance)
        write_text(tmp / "README.md", model_card(name, provenance, **settings))
        if settings["gguf"]:
            config = model_config(language_model)
            export_gguf_lora(tmp, config, tmp / f"{name}.gguf", name, provenance)
        if settings["merged"]:
            base = load_causal_lm(language_model, allow_unsafe_weights=allow_unsafe_weights)
            export_merged(base, load_tokenizer(language_model), last, tmp / "merged")
    return Path(out_dir)
