"""Which family of image model a base model folder holds, read from its configs alone.

loramill trains the Stable Diffusion 1.x/2.x family: a UNet on 4-channel latents conditioned
on one CLIP text encoder. A folder of another family or kind (SDXL and its refiner, an
inpainting or depth UNet, a transformer denoiser such as Flux or SD3) is refused in one line
naming what was found: when the workflow parses, or for a hub model not downloaded yet, by the
job that downloads it, before anything loads it. Free of torch: it runs at parse time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.model_files import HUB_ID, hub_snapshot

TRAINED = "Stable Diffusion 1.x/2.x (a UNet on 4 latent channels, one CLIP text encoder)"


def _config(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None where there is none to read (the structural checks say why)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def found_other_family(folder: Path) -> str | None:
    """What ``folder`` holds when it is not an SD 1.x/2.x pipeline, None when it is one or
    when its configs cannot tell."""
    pipeline = (_config(folder / "model_index.json") or {}).get("_class_name", "pipeline")
    unet = _config(folder / "unet" / "config.json")
    if unet is None:
        if (folder / "transformer").is_dir():
            return f"a {pipeline} whose denoiser is a transformer (transformer/), not a UNet"
        return None
    if unet.get("addition_embed_type") == "text_time":  # SDXL's size and crop conditioning
        if not (folder / "text_encoder").is_dir() and (folder / "text_encoder_2").is_dir():
            return f"an SDXL refiner ({pipeline}: OpenCLIP bigG only)"
        return f"an SDXL model ({pipeline}: two text encoders, size and crop conditioning)"
    channels = unet.get("in_channels", 4)
    if channels != 4:
        kind = {9: "an inpainting model", 5: "a depth-conditioned model"}.get(channels, "a model")
        return f"{kind} ({pipeline}: its UNet takes {channels} input channels, not 4)"
    return None


def check_image_family(spec: str) -> None:
    """Refuse a ``base_model`` of a family loramill does not train, naming what it holds: a
    local folder, or a hub id's snapshot in the local cache (one not downloaded yet is judged
    by the first job, once it has fetched it: loramill.content_params)."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        folder = hub_snapshot(spec) if HUB_ID.match(spec) else None
    if folder is not None and (found := found_other_family(folder)):
        raise LoramillError(f"base_model '{spec}': {found}; loramill trains {TRAINED}")
