"""Which family of image model a base model folder holds, read from its configs alone.

loramill trains two families of UNet on 4-channel latents: Stable Diffusion 1.x/2.x (``sd1``,
``sd2``: one CLIP text encoder) and SDXL (``sdxl``: two CLIP text encoders, size and crop
conditioning); and one family of transformer on packed 16-channel latents: FLUX.1 [dev] and
[schnell] (``flux``) and Chroma (``chroma``), told apart by loramill.models.flux.detect. Each
family's code lives in its own module (loramill.models.sd, loramill.models.sdxl,
loramill.models.flux); this one tells them apart. A folder of another kind (the SDXL
refiner, an inpainting or depth UNet, Flux's Fill or Kontext, SD3's transformer) is refused
in one line naming what was found: when the workflow parses, or for a hub model not
downloaded yet, by the job that downloads it, before anything loads it. ``base_model_family``
may force a family; one the model is not is refused naming both. Free of torch: it runs at
parse time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.model_files import HUB_ID, hub_snapshot
from loramill.models.flux.detect import HALF_ENCODERS, transformer_family

# The pipeline component each family denoises with, and trains a LoRA on
DENOISERS = ("unet", "transformer")
FAMILIES = ("sd1", "sd2", "sdxl", "flux", "chroma")
DESCRIBED = {
    "sd1": "Stable Diffusion 1.x",
    "sd2": "Stable Diffusion 2.x",
    "sdxl": "SDXL",
    "flux": "FLUX.1",
    "chroma": "Chroma",
}
TRAINED = (
    "Stable Diffusion 1.x/2.x and SDXL base models (a UNet on 4 latent channels), "
    "FLUX.1 [dev] / [schnell] and Chroma"
)


def _config(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None where there is none to read (the structural checks say why)."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def _refused(folder: Path, pipeline: str, unet: dict[str, Any] | None) -> str | None:
    """What ``folder`` holds when it is a UNet model of no family loramill trains, else None."""
    if unet is None:
        return None
    if unet.get("addition_embed_type") == "text_time" and not (folder / "text_encoder").is_dir():
        return f"an SDXL refiner ({pipeline}: OpenCLIP bigG only)"
    channels = unet.get("in_channels", 4)
    if channels != 4:
        kind = {9: "an inpainting model", 5: "a depth-conditioned model"}.get(channels, "a model")
        return f"{kind} ({pipeline}: its UNet takes {channels} input channels, not 4)"
    return None


def folder_family(folder: Path) -> str | None:
    """The family of a diffusers folder from its UNet config (None when it has none: the
    structural checks say what is missing); raises for a kind loramill does not train."""
    pipeline = (_config(folder / "model_index.json") or {}).get("_class_name", "pipeline")
    unet = _config(folder / "unet" / "config.json")
    transformer = _config(folder / "transformer" / "config.json")
    try:
        if unet is None and transformer is not None:
            return transformer_family(pipeline, transformer)
        if found := _refused(folder, pipeline, unet):
            raise LoramillError(found)
    except LoramillError as error:
        raise LoramillError(f"{error}; loramill trains {TRAINED}") from None
    return None if unet is None else unet_family(unet)


def unet_family(unet: Any) -> str:
    """The family of a UNet of a family loramill trains, from its config (a mapping)."""
    if unet.get("addition_embed_type") == "text_time":  # SDXL's size and crop conditioning
        return "sdxl"
    return "sd2" if unet.get("cross_attention_dim") == 1024 else "sd1"


def image_family(spec: str, forced: str = "auto") -> str | None:
    """The family of ``base_model`` ``spec``: a local folder, or a hub id's snapshot in the
    local cache (None for one not downloaded yet: the first job judges it once fetched,
    loramill.content_params). ``forced`` (``base_model_family``) must agree with the model."""
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        folder = hub_snapshot(spec) if HUB_ID.match(spec) else None
    try:
        found = folder_family(folder) if folder is not None else None
    except LoramillError as error:
        raise LoramillError(f"base_model '{spec}': {error}") from None
    if forced not in ("auto", *FAMILIES):
        raise LoramillError(f"base_model_family '{forced}': use auto | {' | '.join(FAMILIES)}")
    if forced != "auto" and found is not None and found != forced:
        raise LoramillError(
            f"base_model_family '{forced}' ({DESCRIBED[forced]}) but base_model '{spec}' is "
            f"{DESCRIBED[found]} ({found}); set base_model_family: {found} or auto"
        )
    return found if forced == "auto" else forced


def family_code(name: str, guidance_embeds: bool = True) -> Any:
    """The family's code (loramill.models.sd, .sdxl or .flux; imports torch).
    ``guidance_embeds``: a FLUX.1 transformer's ([dev]: True, [schnell]: False)."""
    if name in ("flux", "chroma"):
        from loramill.models.flux.family import Flux

        return Flux(name, guidance_embeds)
    if name == "sdxl":
        from loramill.models.sdxl import StableDiffusionXL

        return StableDiffusionXL()
    from loramill.models.sd import StableDiffusion

    return StableDiffusion(name)


def half_in_training(family: str | None, mixed_precision: str) -> tuple[str, ...]:
    """The components a training job's memory request counts in half precision: under mixed
    precision a Flux-family run's transformer and T5, which load in it. The UNet families are
    counted in float32: their measured bf16 peaks are above their weights in half precision
    (bench/README.md)."""
    if mixed_precision == "no" or family not in HALF_ENCODERS:
        return ()
    return ("transformer", *HALF_ENCODERS[family])
