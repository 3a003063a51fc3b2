"""Captioners: the one interface every auto-captioning backend implements, the registry the
``caption.backend`` key picks from, and the backends that need no model (``template``,
``none``). Backends that run a model are in loramill.captions.sentences.
"""

from __future__ import annotations

import re
import string
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image

from loramill import LoramillError


@dataclass(frozen=True)
class CaptionContext:
    """What a captioner may know beyond the image: the dataset and its trigger word."""

    dataset: str = ""
    trigger: str = ""


# Options that change how fast captions come, or whether weights may be pickle, never what
# they say.
SPEED_ONLY = frozenset({"batch_size", "allow_unsafe_weights"})
# Options of the stage, applied to every backend's captions (loramill.captions.autocaption.finish).
STAGE_OPTIONS = ("prefix", "suffix", "max_length")


class Captioner(ABC):
    """Captions a batch of (name, image) pairs; ``name`` is the image's file name."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # config keys this backend reads
    # False for the backends that caption without looking at the image (template, none): a
    # kohya repeats folder's concept is a better caption than theirs (captions.autocaption).
    sees_images: ClassVar[bool] = True
    batch_size: int = 1

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner: ...

    @abstractmethod
    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]: ...

    @classmethod
    def output_options(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        """The options that change what this backend writes (not how fast): part of each
        cached caption's key."""
        return {k: config.get(k) for k in cls.options if k not in SPEED_ONLY}


CAPTIONERS: dict[str, type[Captioner]] = {}


def register(cls: type[Captioner]) -> type[Captioner]:
    CAPTIONERS[cls.name] = cls
    return cls


def positive_int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    # bool is an int subclass; `batch_size: true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoramillError(f"caption.{key} {value!r}: expected a positive integer")
    return value


def string_option(config: Mapping[str, Any], key: str, default: str) -> str:
    value = config.get(key, default)
    if not isinstance(value, str):
        raise LoramillError(f"caption.{key} {value!r}: expected a string")
    return value


def flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key, False)
    if not isinstance(value, bool):
        raise LoramillError(f"caption.{key} {value!r}: expected true or false")
    return value


# --- template: no model, captions from the file name -------------------------------------

WORD_SEPARATORS = re.compile(r"[_\-.\s]+")


def stem_words(name: str) -> str:
    """``red_circle-02.png`` -> ``red circle``: split the stem, drop numbering tokens."""
    parts = WORD_SEPARATORS.split(Path(name).stem)
    return " ".join(part for part in parts if part and not part.isdigit())


def tidy_caption(text: str) -> str:
    """Remove the doubled spaces and commas that empty placeholders leave behind."""
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+,", ",", text)
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,")


@register
class TemplateCaptioner(Captioner):
    name = "template"
    options = ("template",)
    sees_images = False
    batch_size = 256
    PLACEHOLDERS = ("trigger", "dataset", "words")

    def __init__(self, template: str, context: CaptionContext) -> None:
        self.template = template
        self.context = context
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(template)]
        except ValueError as error:
            raise LoramillError(f"caption.template {template!r}: {error}") from None
        for field in fields:
            if field is not None and field not in self.PLACEHOLDERS:
                known = ", ".join(f"{{{p}}}" for p in self.PLACEHOLDERS)
                raise LoramillError(
                    f"caption.template: unknown placeholder {{{field}}}; use {known}"
                )

    @classmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner:
        return cls(string_option(config, "template", "{words}"), context)

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        dataset = self.context.dataset.replace("_", " ")
        return [
            tidy_caption(
                self.template.format(
                    trigger=self.context.trigger, dataset=dataset, words=stem_words(name)
                )
            )
            for name, _ in images
        ]


@register
class NoCaptioner(Captioner):
    """Captions come from human edits only: every auto caption is empty."""

    name = "none"
    sees_images = False
    batch_size = 1024

    @classmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner:
        return cls()

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        return ["" for _ in images]


def captioner_class(config: Mapping[str, Any]) -> type[Captioner]:
    """The backend class the ``caption`` section names; checks names without loading models."""
    backend = config.get("backend", "template")
    if backend not in CAPTIONERS:
        choices = ", ".join(sorted(CAPTIONERS))
        raise LoramillError(
            f"caption.backend '{backend}': unknown captioner; choose one of: {choices}"
        )
    # Keys of other backends may stay in the section when switching; only typos are refused.
    known = {"backend", *STAGE_OPTIONS}.union(*(cls.options for cls in CAPTIONERS.values()))
    unknown = sorted(set(config) - known)
    if unknown:
        keys = ", ".join(sorted(known))
        raise LoramillError(f"caption.{unknown[0]}: unknown key; known keys: {keys}")
    return CAPTIONERS[backend]


def make_captioner(config: Mapping[str, Any], *, dataset: str = "", trigger: str = "") -> Captioner:
    """Build the captioner the ``caption`` config section names (``backend`` key)."""
    context = CaptionContext(dataset=dataset, trigger=trigger)
    return captioner_class(config).from_config(config, context)
