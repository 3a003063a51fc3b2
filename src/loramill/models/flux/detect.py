"""Which family a base model whose denoiser is a transformer (``transformer/``) belongs to, read
from its configs alone, for loramill.models.families once the workflow takes Flux.

``flux`` is FLUX.1 [dev] or [schnell] (diffusers' ``FluxPipeline`` on a
``FluxTransformer2DModel``: [dev] embeds a guidance scale, [schnell] does not); ``chroma`` is
Chroma (``ChromaPipeline`` on a ``ChromaTransformer2DModel``). Flux's task models — Fill
(inpainting: 384 input features), the Canny and Depth Control models (128), Kontext (image
editing, the [dev] transformer in ``FluxKontextPipeline``) — and other transformer denoisers
(SD3, …) are refused in one line naming what was found. Free of torch: it runs at parse time.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from loramill import LoramillError
from loramill.models.flux.layout import is_chroma

TRANSFORMERS = {"FluxTransformer2DModel": "flux", "ChromaTransformer2DModel": "chroma"}
# The frozen text encoder a Flux-family run holds in half precision under mixed precision:
# T5-XXL (19 GB in float32), each pipeline's last (loramill.models.flux.family)
HALF_ENCODERS = {"flux": ("text_encoder_2",), "chroma": ("text_encoder",)}
PIPELINES = {"FluxPipeline": "flux", "ChromaPipeline": "chroma"}
TASK_MODELS = {
    "FluxFillPipeline": "FLUX.1 Fill (inpainting)",
    "FluxKontextPipeline": "FLUX.1 Kontext (image editing)",
    "FluxControlPipeline": "a FLUX.1 Control model (Canny or Depth)",
}
FEATURES = 64  # 16 latent channels packed 2 × 2; Fill takes 384, Control 128


def transformer_family(pipeline: str, transformer: Mapping[str, Any]) -> str:
    """``flux`` or ``chroma`` for a folder of pipeline class ``pipeline`` whose transformer's
    config is ``transformer``; raises for any other kind."""
    if pipeline in TASK_MODELS:
        raise LoramillError(f"{TASK_MODELS[pipeline]} ({pipeline}): a task model, not a base model")
    kind = transformer.get("_class_name", "an unnamed transformer")
    family = TRANSFORMERS.get(kind)
    if family is None:
        raise LoramillError(f"a {pipeline} whose denoiser is a {kind}, not a Flux transformer")
    features = transformer.get("in_channels", FEATURES)
    if features != FEATURES:
        task = {384: "a Fill (inpainting) model", 128: "a Control model"}.get(features, "a model")
        raise LoramillError(
            f"{task} ({pipeline}: its transformer takes {features} input features, not {FEATURES})"
        )
    if PIPELINES.get(pipeline, family) != family:
        raise LoramillError(f"a {pipeline} holding a {kind}")
    return family


def flux_variant(transformer: Mapping[str, Any]) -> str:
    """``dev`` (a guidance embedding), ``schnell`` or ``chroma``: what labels the LoRA."""
    if is_chroma(transformer):
        return "chroma"
    return "dev" if transformer.get("guidance_embeds") else "schnell"
