"""Exporting a text adapter (issue #15): the peft adapter folder transformers users load with
``PeftModel.from_pretrained``, and optionally the base model with the adapter merged in, a
plain transformers model folder (tokenizer included) that needs no peft at all.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.files import atomic_folder

ADAPTER_FILES = ("adapter_model.safetensors", "adapter_config.json")
PROVENANCE_FILE = "loramill_provenance.json"


def export_adapter_folder(
    checkpoint: str | os.PathLike, out_dir: str | os.PathLike, provenance: dict[str, Any]
) -> Path:
    """Copy a checkpoint's adapter folder to ``out_dir`` with its provenance beside it."""
    source, out = Path(checkpoint), Path(out_dir)
    missing = [name for name in ADAPTER_FILES if not (source / name).is_file()]
    if missing:
        raise LoramillError(f"{source}: not a peft adapter folder (no {missing[0]})")
    with atomic_folder(out) as tmp:
        for name in ADAPTER_FILES:
            shutil.copyfile(source / name, tmp / name)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=1, sort_keys=True) + "\n")
    return out


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
