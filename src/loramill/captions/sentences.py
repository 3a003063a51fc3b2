"""Captioners that write sentences with a transformers model: ``blip`` (image-to-text: BLIP,
GIT) and ``vlm`` (instruction vision-language models through the image-text-to-text classes).
Taggers (``clip``, ``wd14``) are in loramill.captions.taggers.

Models load from a local folder or a hub id in the local cache; weights from safetensors
unless the ``allow_unsafe_weights`` opt-in allows pickle files too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from loramill import LoramillError
from loramill.captions.backends import (
    CaptionContext,
    Captioner,
    flag,
    positive_int,
    register,
    string_option,
)

# --- loading ---------------------------------------------------------------------------------


def load_model(
    spec: str, key: str, model_class: str, allow_unsafe_weights: bool
) -> tuple[Any, Any]:
    """``(processor, model)`` from a local folder or a hub id in the local cache; errors are
    one line naming the config ``key``."""
    import transformers

    from loramill.model_files import HUB_ID

    path = Path(spec).expanduser()
    local = path.exists()
    if not local and not (HUB_ID.match(spec) and not spec.startswith((".", "/", "~"))):
        raise LoramillError(f"{key} '{spec}': no such folder, and not a hub id (owner/name)")
    if local and not allow_unsafe_weights and not any(path.glob("*.safetensors*")):
        if any(path.glob("*.bin*")):
            raise LoramillError(
                f"{key} '{spec}': only pickle weights (*.bin); convert them to "
                "safetensors or set allow_unsafe_weights: true (top level of the config)"
            )
        raise LoramillError(f"{key} '{spec}': no model weights in this folder")
    source = str(path) if local else spec
    try:
        processor = transformers.AutoProcessor.from_pretrained(source, local_files_only=local)
        model = getattr(transformers, model_class).from_pretrained(
            # the opt-in allows pickle weights; safetensors still win where both exist
            source,
            use_safetensors=None if allow_unsafe_weights else True,
            local_files_only=local,
        )
    # from_pretrained reports a bad folder or hub id as any of these, with multi-line text.
    except (OSError, ValueError, KeyError, TypeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LoramillError(
            f"{key} '{spec}': cannot load{_offline_hint(local)}: {reason}"
        ) from error
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise LoramillError(f"{key} '{spec}': its processor lacks a tokenizer or image processor")
    return processor, model.eval()


def _offline_hint(local: bool) -> str:
    if local or os.environ.get("HF_HUB_OFFLINE", "") in ("", "0", "false"):
        return ""
    return (
        " (offline: name a local model folder, or fill the hub cache where there is network,"
        " e.g. `hf download <id>`)"
    )


# --- captioners that generate text ----------------------------------------------------------

DTYPES = ("float32", "bfloat16", "float16")


class GeneratingCaptioner(Captioner):
    """A transformers model that writes each caption by greedy (or beam) decoding: the same
    image and settings always give the same text."""

    MODEL_KEY: ClassVar[str]
    DEFAULT_MODEL: ClassVar[str]
    GENERATION = (
        "max_new_tokens",
        "num_beams",
        "repetition_penalty",
        "dtype",
        "batch_size",
        "allow_unsafe_weights",
        "device",
    )

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from loramill.devices import resolve_device

        self.settings, self.batch_size = settings, settings["batch_size"]
        self.processor, self.model = load_model(
            settings["model"],
            f"caption.{self.MODEL_KEY}",
            "AutoModelForImageTextToText",
            settings["allow_unsafe"],
        )
        self.device = resolve_device(settings["device"])
        self.model.to(self.device, dtype=getattr(torch, settings["dtype"]))

    @classmethod
    def settings_from(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        model = string_option(config, cls.MODEL_KEY, cls.DEFAULT_MODEL).strip()
        if not model:  # Path("") is the working directory: never load from it by accident
            raise LoramillError(f"caption.{cls.MODEL_KEY} '': name a hub id or a local folder")
        dtype = string_option(config, "dtype", "float32")
        if dtype not in DTYPES:
            raise LoramillError(f"caption.dtype '{dtype}': choose one of {', '.join(DTYPES)}")
        penalty = config.get("repetition_penalty", 1.0)
        if isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or penalty <= 0:
            raise LoramillError(f"caption.repetition_penalty {penalty!r}: expected a number > 0")
        return {
            "model": model,
            "max_new_tokens": positive_int(config, "max_new_tokens", 30),
            "num_beams": positive_int(config, "num_beams", 1),
            "repetition_penalty": float(penalty),
            "dtype": dtype,
            "batch_size": positive_int(config, "batch_size", 8),
            "allow_unsafe": flag(config, "allow_unsafe_weights"),
            "device": string_option(config, "device", "auto"),
        }

    def generate(self, inputs: Any, cut_prompt: bool) -> list[str]:
        """Decoded text for a processed batch; ``cut_prompt``: without the prompt tokens a
        decoder-only model echoes first."""
        import torch

        inputs = inputs.to(self.device, dtype=self.model.dtype)  # casts float tensors only
        settings = self.settings
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=settings["max_new_tokens"],
                num_beams=settings["num_beams"],
                repetition_penalty=settings["repetition_penalty"],
                do_sample=False,
            )
        if cut_prompt and not self.model.config.is_encoder_decoder:
            output = output[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(output, skip_special_tokens=True)]


@register
class BlipCaptioner(GeneratingCaptioner):
    """Image-to-text models (BLIP, BLIP-2, GIT); ``prompt`` is text the caption continues."""

    name = "blip"
    MODEL_KEY = "model"
    DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"
    options = ("model", "prompt", *GeneratingCaptioner.GENERATION)

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        self.prompt = settings["prompt"].strip()
        # BLIP's output repeats the prompt as the tokenizer normalised it (lowercased,
        # re-spaced), so strip that spelling, not the raw config text.
        tokenizer = self.processor.tokenizer
        prompt_ids = tokenizer(self.prompt, add_special_tokens=False)["input_ids"]
        self.prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner:
        return cls({**cls.settings_from(config), "prompt": string_option(config, "prompt", "")})

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        pictures = [image for _, image in images]
        text = {"text": [self.prompt] * len(pictures)} if self.prompt else {}
        inputs = self.processor(images=pictures, return_tensors="pt", **text)
        return [self._strip_prompt(text) for text in self.generate(inputs, cut_prompt=False)]

    def _strip_prompt(self, text: str) -> str:
        if self.prompt_text and text.startswith(self.prompt_text):
            return text[len(self.prompt_text) :].strip()
        return text


@register
class VlmCaptioner(GeneratingCaptioner):
    """Asks an image-text-to-text model (Qwen-VL, SmolVLM, LLaVA, Florence-2 …) to describe
    each image. With a chat template the prompt is sent as a user turn holding the image;
    without one (Florence-2) it is sent as is, e.g. a task prompt such as
    ``<MORE_DETAILED_CAPTION>``."""

    name = "vlm"
    MODEL_KEY = "vlm_model"
    DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
    DEFAULT_PROMPT = "Describe this image in one sentence."
    options = ("vlm_model", "vlm_prompt", *GeneratingCaptioner.GENERATION)

    def __init__(self, settings: dict[str, Any]) -> None:
        super().__init__(settings)
        self.processor.tokenizer.padding_side = "left"  # batched generation continues the prompt
        prompt = settings["vlm_prompt"]
        if getattr(self.processor, "chat_template", None):
            turn = [{"type": "image"}, {"type": "text", "text": prompt}]
            messages = [{"role": "user", "content": turn}]
            prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        self.prompt = prompt

    @classmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner:
        prompt = string_option(config, "vlm_prompt", cls.DEFAULT_PROMPT)
        if not prompt.strip():
            raise LoramillError("caption.vlm_prompt: empty; say what to write about the image")
        return cls({**cls.settings_from(config), "vlm_prompt": prompt})

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        pictures = [image for _, image in images]
        text = [self.prompt] * len(pictures)
        inputs = self.processor(images=pictures, text=text, return_tensors="pt", padding=True)
        return self.generate(inputs, cut_prompt=True)
