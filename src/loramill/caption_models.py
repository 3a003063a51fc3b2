"""Captioners that write sentences with a transformers model: ``blip`` (image-to-text: BLIP,
GIT) and ``vlm`` (instruction vision-language models through the image-text-to-text classes).
Taggers (``clip``, ``wd14``) are in loramill.caption_taggers.

Models load from a local folder or a hub id in the local cache; weights from safetensors
unless the ``allow_unsafe_weights`` opt-in allows pickle files too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image

from loramill import LoramillError
from loramill.captioners import (
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

    from loramill.model import HUB_ID

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


# --- blip: transformers image-captioning model ---------------------------------------------


@register
class BlipCaptioner(Captioner):
    name = "blip"
    options = ("model", "max_new_tokens", "batch_size", "prompt", "allow_unsafe_weights", "device")
    DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"

    def __init__(
        self,
        model: str,
        max_new_tokens: int = 30,
        batch_size: int = 8,
        prompt: str = "",
        allow_unsafe_weights: bool = False,
        device: str = "auto",
    ) -> None:
        from loramill.devices import resolve_device

        self.processor, self.model = load_model(
            model, "caption.model", "BlipForConditionalGeneration", allow_unsafe_weights
        )
        self.device = resolve_device(device)
        self.model.to(self.device)
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.prompt = prompt.strip()
        # The output repeats the prompt as the tokenizer normalised it (lowercased, re-spaced),
        # so strip that spelling, not the raw config text.
        tokenizer = self.processor.tokenizer
        prompt_ids = tokenizer(self.prompt, add_special_tokens=False)["input_ids"]
        self.prompt_text = tokenizer.decode(prompt_ids, skip_special_tokens=True).strip()

    @classmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner:
        model = string_option(config, "model", cls.DEFAULT_MODEL).strip()
        if not model:  # Path("") is the working directory: never load from it by accident
            raise LoramillError("caption.model '': name a hub id or a local model folder")
        return cls(
            model=model,
            max_new_tokens=positive_int(config, "max_new_tokens", 30),
            batch_size=positive_int(config, "batch_size", 8),
            prompt=string_option(config, "prompt", ""),
            allow_unsafe_weights=flag(config, "allow_unsafe_weights"),
            device=string_option(config, "device", "auto"),
        )

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        import torch

        pictures = [image for _, image in images]
        if self.prompt:
            inputs = self.processor(
                images=pictures, text=[self.prompt] * len(pictures), return_tensors="pt"
            )
        else:
            inputs = self.processor(images=pictures, return_tensors="pt")
        inputs = inputs.to(self.device)
        with torch.inference_mode():
            # Greedy decoding: the same image and model always give the same caption.
            output = self.model.generate(
                **inputs, max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1
            )
        texts = self.processor.batch_decode(output, skip_special_tokens=True)
        return [self._strip_prompt(text.strip()) for text in texts]

    def _strip_prompt(self, text: str) -> str:
        if self.prompt_text and text.startswith(self.prompt_text):
            return text[len(self.prompt_text) :].strip()
        return text


# --- vlm: instruction vision-language models --------------------------------------------


@register
class VlmCaptioner(Captioner):
    """Asks an image-text-to-text model (Qwen-VL, SmolVLM, LLaVA, Florence-2 …) to describe
    each image. With a chat template the prompt is sent as a user turn holding the image;
    without one (Florence-2) it is sent as is, e.g. a task prompt such as
    ``<MORE_DETAILED_CAPTION>``. Greedy decoding: the same image always gets the same text."""

    name = "vlm"
    options = (
        "vlm_model",
        "vlm_prompt",
        "max_new_tokens",
        "batch_size",
        "allow_unsafe_weights",
        "device",
    )
    DEFAULT_MODEL = "HuggingFaceTB/SmolVLM-256M-Instruct"
    DEFAULT_PROMPT = "Describe this image in one sentence."

    def __init__(self, settings: dict[str, Any]) -> None:
        from loramill.devices import resolve_device

        self.settings, self.batch_size = settings, settings["batch_size"]
        self.processor, self.model = load_model(
            settings["vlm_model"],
            "caption.vlm_model",
            "AutoModelForImageTextToText",
            settings["allow_unsafe"],
        )
        self.device = resolve_device(settings["device"])
        self.model.to(self.device)
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
        return cls(
            {
                "vlm_model": string_option(config, "vlm_model", cls.DEFAULT_MODEL),
                "vlm_prompt": prompt,
                "max_new_tokens": positive_int(config, "max_new_tokens", 30),
                "batch_size": positive_int(config, "batch_size", 8),
                "allow_unsafe": flag(config, "allow_unsafe_weights"),
                "device": string_option(config, "device", "auto"),
            }
        )

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        import torch

        pictures = [image for _, image in images]
        inputs = self.processor(
            images=pictures, text=[self.prompt] * len(pictures), return_tensors="pt", padding=True
        ).to(self.device)
        with torch.inference_mode():
            output = self.model.generate(
                **inputs,
                max_new_tokens=self.settings["max_new_tokens"],
                do_sample=False,
                num_beams=1,
            )
        if not self.model.config.is_encoder_decoder:  # the output repeats the prompt first
            output = output[:, inputs["input_ids"].shape[1] :]
        return [t.strip() for t in self.processor.batch_decode(output, skip_special_tokens=True)]
