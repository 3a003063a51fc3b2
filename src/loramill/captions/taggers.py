"""Captioners that write tags: ``clip`` (zero-shot labels from a vocabulary, CLIP through
transformers) and ``wd14`` (WD14-style ONNX taggers through onnxruntime).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

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
from loramill.captions.sentences import load_model

# --- clip: zero-shot labels from a vocabulary --------------------------------------------


@register
class ClipCaptioner(Captioner):
    """Scores each image against every term of the vocabulary with CLIP; per category, keeps
    the ``top_k`` best terms whose probability (softmax within the category) reaches
    ``threshold``, and writes them in vocabulary order."""

    name = "clip"
    options = (
        "clip_model",
        "vocabulary",
        "top_k",
        "threshold",
        "clip_template",
        "batch_size",
        "allow_unsafe_weights",
        "device",
    )
    DEFAULT_MODEL = "openai/clip-vit-base-patch32"

    def __init__(self, settings: dict[str, Any]) -> None:
        import torch

        from loramill.devices import resolve_device

        self.settings = settings
        self.batch_size = settings["batch_size"]
        self.processor, self.model = load_model(
            settings["clip_model"], "caption.clip_model", "CLIPModel", settings["allow_unsafe"]
        )
        self.device = resolve_device(settings["device"])
        self.model.to(self.device)
        vocabulary = settings["vocabulary"]
        self.categories = [(c, len(terms)) for c, terms in vocabulary.items()]
        self.terms = [t for terms in vocabulary.values() for t in terms]
        prompts = [settings["clip_template"].format(term=t) for t in self.terms]
        text = self.processor(text=prompts, return_tensors="pt", padding=True).to(self.device)
        with torch.inference_mode():
            self.text = _unit(self.model.get_text_features(**text))

    @classmethod
    def output_options(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        resolved = super().output_options(config)
        return resolved | {"vocabulary": _vocabulary(config)}  # the shipped list by content

    @classmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner:
        template = string_option(config, "clip_template", "a photo of {term}")
        if "{term}" not in template:
            raise LoramillError(f"caption.clip_template {template!r}: needs {{term}}")
        return cls(
            {
                "clip_model": string_option(config, "clip_model", cls.DEFAULT_MODEL),
                "vocabulary": _vocabulary(config),
                "top_k": positive_int(config, "top_k", 2),
                "threshold": _probability(config, "threshold", 0.2),
                "clip_template": template,
                "batch_size": positive_int(config, "batch_size", 8),
                "allow_unsafe": flag(config, "allow_unsafe_weights"),
                "device": string_option(config, "device", "auto"),
            }
        )

    def scores(self, images: list[Image.Image]) -> Any:
        """Per image, each term's probability within its category."""
        import torch

        pixels = self.processor(images=images, return_tensors="pt").to(self.device)
        with torch.inference_mode():
            image = _unit(self.model.get_image_features(**pixels))
            logits = self.model.logit_scale.exp() * image @ self.text.T
        sizes = [size for _, size in self.categories]
        return torch.cat([part.softmax(-1) for part in logits.split(sizes, -1)], -1).cpu()

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        captions = []
        for row in self.scores([image for _, image in images]):
            kept, start = [], 0
            for _, size in self.categories:
                part = row[start : start + size]
                best = part.argsort(descending=True, stable=True)[: self.settings["top_k"]]
                chosen = {int(i) for i in best if part[i] >= self.settings["threshold"]}
                kept += [self.terms[start + i] for i in sorted(chosen)]
                start += size
            captions.append(", ".join(kept))
        return captions


def _unit(features: Any) -> Any:
    """Projected embeddings at unit length (transformers 5 wraps them in a model output)."""
    import torch

    tensor = getattr(features, "pooler_output", features)
    return torch.nn.functional.normalize(tensor, dim=-1)


def _vocabulary(config: Mapping[str, Any]) -> dict[str, list[str]]:
    from loramill.captions.clip_vocabulary import DEFAULT_VOCABULARY

    vocabulary = config.get("vocabulary") or DEFAULT_VOCABULARY
    valid = isinstance(vocabulary, Mapping) and all(
        isinstance(terms, list) and terms and all(isinstance(t, str) and t.strip() for t in terms)
        for terms in vocabulary.values()
    )
    if not valid:
        raise LoramillError(
            "caption.vocabulary: expected a mapping of category to a non-empty list of terms"
        )
    return {str(category): list(terms) for category, terms in vocabulary.items()}


# --- wd14: ONNX tagger -------------------------------------------------------------------

RATING, GENERAL, CHARACTER = 9, 0, 4  # selected_tags.csv categories


def _hub_file(spec: str, name: str) -> Path:
    """``name`` in a local folder, or in the hub cache's snapshot of the hub id ``spec``."""
    folder = Path(spec).expanduser()
    if folder.is_dir():
        path = folder / name
    else:
        from huggingface_hub import try_to_load_from_cache

        found = try_to_load_from_cache(spec, name)
        path = Path(found) if isinstance(found, str) else folder / name
    if not path.is_file():
        raise LoramillError(
            f"caption.wd14_model '{spec}': no {name} (name a local folder holding model.onnx "
            "and selected_tags.csv, or fill the hub cache where there is network)"
        )
    return path


def read_tags(path: Path) -> list[tuple[str, int]]:
    """(name, category) per output of the tagger, from ``selected_tags.csv``."""
    import csv

    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    try:
        return [(row["name"], int(row["category"])) for row in rows]
    except (KeyError, TypeError, ValueError):
        raise LoramillError(f"{path}: expected columns name and category (an integer)") from None


@register
class Wd14Captioner(Captioner):
    """Tags an image with the tagger's general (and character) tags above their thresholds:
    characters first, then general tags, each by falling probability (ties in file order)."""

    name = "wd14"
    options = (
        "wd14_model",
        "general_threshold",
        "character_threshold",
        "rating_tags",
        "exclude_tags",
        "batch_size",
        "device",
    )
    DEFAULT_MODEL = "SmilingWolf/wd-v1-4-convnextv2-tagger-v2"

    def __init__(self, settings: dict[str, Any]) -> None:
        import onnxruntime

        spec = settings["wd14_model"]
        self.settings, self.batch_size = settings, settings["batch_size"]
        self.tags = read_tags(_hub_file(spec, "selected_tags.csv"))
        providers = ["CPUExecutionProvider"]
        if settings["device"] != "cpu" and "CUDAExecutionProvider" in (
            onnxruntime.get_available_providers()
        ):
            providers.insert(0, "CUDAExecutionProvider")
        model = _hub_file(spec, "model.onnx")
        try:
            self.session = onnxruntime.InferenceSession(str(model), providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types
            raise LoramillError(f"caption.wd14_model '{spec}': cannot load: {error}") from error
        self.input = self.session.get_inputs()[0]
        self.size = self.input.shape[1] if isinstance(self.input.shape[1], int) else 448

    @classmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner:
        exclude = config.get("exclude_tags") or []
        if not isinstance(exclude, list) or not all(isinstance(t, str) for t in exclude):
            raise LoramillError(f"caption.exclude_tags {exclude!r}: expected a list of tags")
        return cls(
            {
                "wd14_model": string_option(config, "wd14_model", cls.DEFAULT_MODEL),
                "general": _probability(config, "general_threshold", 0.35),
                "character": _probability(config, "character_threshold", 0.85),
                "rating_tags": flag(config, "rating_tags"),
                "exclude": {_tag_text(t) for t in exclude},
                "batch_size": positive_int(config, "batch_size", 8),
                "device": string_option(config, "device", "auto"),
            }
        )

    def pixels(self, image: Image.Image) -> Any:
        """The WD14 input: padded square on white, resized, BGR, 0–255 floats."""
        import numpy as np

        side = max(image.size)
        square = Image.new("RGB", (side, side), (255, 255, 255))
        square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
        resized = square.resize((self.size, self.size), Image.Resampling.BICUBIC)
        return np.asarray(resized, dtype=np.float32)[:, :, ::-1]

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        import numpy as np

        batch = np.stack([self.pixels(image) for _, image in images])
        probabilities = self.session.run(None, {self.input.name: batch})[0]
        return [", ".join(self._chosen(row)) for row in probabilities]

    def _chosen(self, row: Any) -> list[str]:
        settings, picked = self.settings, {CHARACTER: [], GENERAL: [], RATING: []}
        for index, ((tag, category), probability) in enumerate(zip(self.tags, row, strict=True)):
            text = _tag_text(tag)
            if text in settings["exclude"] or category not in picked:
                continue
            if category == RATING and not settings["rating_tags"]:
                continue
            threshold = settings["character"] if category == CHARACTER else settings["general"]
            if category == RATING or probability >= threshold:
                picked[category].append((-float(probability), index, text))
        ratings = sorted(picked[RATING])[:1]  # the one most probable rating
        ordered = sorted(picked[CHARACTER]) + sorted(picked[GENERAL]) + ratings
        return [text for _, _, text in ordered]


def _tag_text(tag: str) -> str:
    """``long_hair`` → ``long hair``; emoticons such as ``^_^`` keep their underscores."""
    return tag.replace("_", " ") if len(tag) > 3 else tag


def _probability(config: Mapping[str, Any], key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise LoramillError(f"caption.{key} {value!r}: expected a number in 0…1")
    return float(value)
