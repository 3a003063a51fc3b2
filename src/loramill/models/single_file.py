"""Single-file checkpoints (what AUTOMATIC1111 and ComfyUI load) as base models.

loramill trains on diffusers pipeline folders. A single ``.safetensors`` checkpoint (SD 1.x/2.x,
or SDXL base such as ``sd_xl_base_1.0.safetensors``, told apart by its keys) is converted
once, by diffusers' own single-file loader, into such a folder, which also keeps
the file's name and its two AUTOMATIC1111 hashes (``loramill_single_file.json``): adapters
trained on it carry them as ``ss_sd_model_hash`` / ``ss_new_sd_model_hash``, so model sites
and A1111 link the LoRA to the checkpoint it was trained on.

    python -m loramill.models.single_file model.safetensors models/my-base [--config CONFIG]

CONFIG: a diffusers folder or hub id holding the pipeline's configs and tokenizer (not its
weights); without it diffusers picks one from the checkpoint's keys and downloads its
configs from the hub.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.files import atomic_folder
from loramill.hashing import LEGACY_LENGTH, LEGACY_OFFSET, hash_file, legacy_hash

SOURCE_FILE = "loramill_single_file.json"


def a1111_hashes(path: str | os.PathLike) -> dict[str, str]:
    """The file's name and AUTOMATIC1111's hashes of it: ``sha256`` (the whole file, A1111's
    new hash and kohya's ss_new_sd_model_hash) and ``model_hash`` (the legacy one)."""
    with open(path, "rb") as handle:
        handle.seek(LEGACY_OFFSET)
        window = handle.read(LEGACY_LENGTH)
    return {"file": Path(path).name, "sha256": hash_file(path), "model_hash": legacy_hash(window)}


def source_checkpoint(folder: str | os.PathLike) -> dict[str, str] | None:
    """What a converted base model folder was made from, or None for any other folder."""
    path = Path(folder) / SOURCE_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as error:
        raise LoramillError(f"{path}: unreadable ({error})") from None


def checkpoint_family(path: Path) -> str:
    """``sdxl`` for an SDXL base checkpoint (its second text encoder sits at
    ``conditioner.embedders.1``), else ``sd1`` (SD 1.x/2.x: diffusers tells them apart); the
    SDXL refiner (OpenCLIP bigG alone, at ``conditioner.embedders.0.model``) is refused."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
    except (OSError, SafetensorError) as error:
        raise LoramillError(f"{path}: cannot read checkpoint ({error})") from None
    if any(key.startswith("conditioner.embedders.1.") for key in keys):
        return "sdxl"
    if any(key.startswith("conditioner.") for key in keys):
        raise LoramillError(f"{path}: an SDXL refiner checkpoint; loramill trains SDXL base")
    return "sd1"


def convert(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, config: str | None) -> Path:
    """Write the diffusers folder for a single-file SD 1.x/2.x or SDXL checkpoint (safetensors
    only: a pickle checkpoint can run code when loaded)."""
    from loramill.models.families import family_code

    source, out = Path(checkpoint), Path(out_dir)
    if source.suffix != ".safetensors":
        raise LoramillError(f"{source}: not a .safetensors checkpoint")
    if out.exists():
        raise LoramillError(f"{out}: already exists")
    local = config is not None and Path(config).exists()
    family = family_code(checkpoint_family(source))
    try:
        pipe = family.pipeline_class().from_single_file(
            str(source), config=config, local_files_only=local, **family.pipeline_options()
        )
    except (OSError, ValueError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise LoramillError(f"{source}: cannot convert ({reason})") from None
    with atomic_folder(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / SOURCE_FILE).write_text(json.dumps(a1111_hashes(source), indent=1) + "\n")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", help="a single-file .safetensors checkpoint")
    parser.add_argument("out_dir", help="the diffusers folder to write (base_model: OUT_DIR)")
    parser.add_argument("--config", help="diffusers folder or hub id with the configs")
    args: Any = parser.parse_args(argv)
    try:
        out = convert(args.checkpoint, args.out_dir, args.config)
    except LoramillError as error:
        print(f"loramill: {error}", file=sys.stderr)
        return 1
    print(f"{out}: converted; set base_model: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
