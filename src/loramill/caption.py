"""Caption stage: one caption per resized image, written as JSON lines.

Backends share one small interface (``Captioner``) and register by name, so a new captioner
(a WD14 ONNX tagger, an instruction VLM) is one class with ``@register``. Output is sorted and
deterministic: the workflow keys later stages on the content of the captions file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import string
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from PIL import Image, UnidentifiedImageError

from loramill import LoramillError
from loramill.caption_cache import CACHE_DIR, CaptionCache, captioner_key
from loramill.files import inside, write_jsonl
from loramill.hashing import HashCache

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionContext:
    """What a captioner may know beyond the image: the dataset and its trigger word."""

    dataset: str = ""
    trigger: str = ""


class Captioner(ABC):
    """Captions a batch of (name, image) pairs; ``name`` is the image's file name."""

    name: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # config keys this backend reads
    batch_size: int = 1

    @classmethod
    @abstractmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner: ...

    @abstractmethod
    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]: ...


CAPTIONERS: dict[str, type[Captioner]] = {}


def register(cls: type[Captioner]) -> type[Captioner]:
    CAPTIONERS[cls.name] = cls
    return cls


def _positive_int(config: Mapping[str, Any], key: str, default: int) -> int:
    value = config.get(key, default)
    # bool is an int subclass; `batch_size: true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise LoramillError(f"caption.{key} {value!r}: expected a positive integer")
    return value


def _string(config: Mapping[str, Any], key: str, default: str) -> str:
    value = config.get(key, default)
    if not isinstance(value, str):
        raise LoramillError(f"caption.{key} {value!r}: expected a string")
    return value


def _flag(config: Mapping[str, Any], key: str) -> bool:
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
        return cls(_string(config, "template", "{words}"), context)

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
    batch_size = 1024

    @classmethod
    def from_config(cls, config: Mapping[str, Any], context: CaptionContext) -> Captioner:
        return cls()

    def caption(self, images: list[tuple[str, Image.Image]]) -> list[str]:
        return ["" for _ in images]


# --- blip: transformers image-captioning model ---------------------------------------------


def _load_blip(spec: str, allow_unsafe_weights: bool) -> tuple[Any, Any]:
    from transformers import AutoProcessor, BlipForConditionalGeneration

    from loramill.model import HUB_ID

    path = Path(spec).expanduser()
    local = path.exists()
    if not local and not (HUB_ID.match(spec) and not spec.startswith((".", "/", "~"))):
        raise LoramillError(
            f"caption.model '{spec}': no such folder, and not a hub id (owner/name)"
        )
    if local and not allow_unsafe_weights and not any(path.glob("*.safetensors*")):
        if any(path.glob("*.bin*")):
            raise LoramillError(
                f"caption.model '{spec}': only pickle weights (*.bin); convert them to "
                "safetensors or set allow_unsafe_weights: true (top level of the config)"
            )
        raise LoramillError(f"caption.model '{spec}': no model weights in this folder")
    source = str(path) if local else spec
    try:
        processor = AutoProcessor.from_pretrained(source, local_files_only=local)
        model = BlipForConditionalGeneration.from_pretrained(
            # the opt-in allows pickle weights; safetensors still win where both exist
            source,
            use_safetensors=None if allow_unsafe_weights else True,
            local_files_only=local,
        )
    # from_pretrained reports a bad folder or hub id as any of these, with multi-line text.
    except (OSError, ValueError, KeyError, TypeError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")
        hint = " (HF_HUB_OFFLINE is set)" if offline and not local else ""
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise LoramillError(f"caption.model '{spec}': cannot load{hint}: {reason}") from error
    if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
        raise LoramillError(f"caption.model '{spec}': no BLIP processor (tokenizer and images)")
    return processor, model.eval()


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

        self.processor, self.model = _load_blip(model, allow_unsafe_weights)
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
        model = _string(config, "model", cls.DEFAULT_MODEL).strip()
        if not model:  # Path("") is the working directory: never load from it by accident
            raise LoramillError("caption.model '': name a hub id or a local model folder")
        return cls(
            model=model,
            max_new_tokens=_positive_int(config, "max_new_tokens", 30),
            batch_size=_positive_int(config, "batch_size", 8),
            prompt=_string(config, "prompt", ""),
            allow_unsafe_weights=_flag(config, "allow_unsafe_weights"),
            device=_string(config, "device", "auto"),
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


# --- the stage ------------------------------------------------------------------------------


def captioner_class(config: Mapping[str, Any]) -> type[Captioner]:
    """The backend class the ``caption`` section names; checks names without loading models."""
    backend = config.get("backend", "template")
    if backend not in CAPTIONERS:
        choices = ", ".join(sorted(CAPTIONERS))
        raise LoramillError(
            f"caption.backend '{backend}': unknown captioner; choose one of: {choices}"
        )
    # Keys of other backends may stay in the section when switching; only typos are refused.
    known = {"backend"}.union(*(cls.options for cls in CAPTIONERS.values()))
    unknown = sorted(set(config) - known)
    if unknown:
        keys = ", ".join(sorted(known))
        raise LoramillError(f"caption.{unknown[0]}: unknown key; known keys: {keys}")
    return CAPTIONERS[backend]


def make_captioner(config: Mapping[str, Any], *, dataset: str = "", trigger: str = "") -> Captioner:
    """Build the captioner the ``caption`` config section names (``backend`` key)."""
    context = CaptionContext(dataset=dataset, trigger=trigger)
    return captioner_class(config).from_config(config, context)


def _read_manifest(resized_dir: Path) -> list[str]:
    manifest_path = resized_dir / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = [entry["file"] for entry in manifest["images"]]
    except FileNotFoundError:
        raise LoramillError(f"{manifest_path}: missing (run the resize stage first)") from None
    except json.JSONDecodeError as error:
        raise LoramillError(f"{manifest_path}: not valid JSON ({error.msg})") from None
    except (KeyError, TypeError):
        raise LoramillError(
            f"{manifest_path}: expected {{'images': [{{'file': ...}}, ...]}}"
        ) from None
    if not all(isinstance(name, str) and name for name in files):
        raise LoramillError(f"{manifest_path}: every image needs a file name")
    duplicates = sorted(name for name, count in Counter(files).items() if count > 1)
    if duplicates:
        raise LoramillError(f"{manifest_path}: image listed twice: {duplicates[0]}")
    if not files:
        quarantined = len(manifest.get("quarantined", []))
        raise LoramillError(f"{manifest_path}: no images to caption ({quarantined} quarantined)")
    return sorted(files)


def _open_rgb(resized_dir: Path, name: str) -> Image.Image:
    path = inside(resized_dir, name)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise LoramillError(f"{path}: listed in manifest.json but missing") from None
    except (UnidentifiedImageError, OSError) as error:
        raise LoramillError(f"{path}: cannot read image ({error})") from None


def _digest(resized_dir: Path, name: str, hashes: HashCache) -> str:
    path = inside(resized_dir, name)
    try:
        return hashes.file(path)
    except FileNotFoundError:
        raise LoramillError(f"{path}: listed in manifest.json but missing") from None


def _caption_all(
    captioner: Captioner, resized: Path, files: list[str]
) -> Iterator[tuple[str, str]]:
    """(file, caption) for each of ``files``, loading one batch of images at a time so
    memory stays flat on large datasets."""
    size = captioner.batch_size
    for start in range(0, len(files), size):
        batch = files[start : start + size]
        texts = captioner.caption([(file, _open_rgb(resized, file)) for file in batch])
        # strict: a backend returning too few captions is a bug, never a silent truncation.
        for file, text in zip(batch, texts, strict=True):
            # One line per caption keeps the later caption .txt files and tag counts clean.
            yield file, " ".join(text.split())
        log.info("captioned %d/%d images with %s", start + len(batch), len(files), captioner.name)


def caption_dataset(
    resized_dir: str | os.PathLike,
    out_jsonl: str | os.PathLike,
    config: Mapping[str, Any],
    dataset: str,
    trigger: str,
    cache_dir: str | os.PathLike = CACHE_DIR,
    hashes: HashCache | None = None,
    name: str = "",
) -> None:
    """Caption every image in ``resized_dir/manifest.json``; write sorted JSONL atomically.

    Records are ``{"image", "image_sha256", "caption", "source"}`` (source: the backend, and
    its model where it has one). Images with a cached caption are not captioned again;
    ``name`` is the dataset's, for the log line only.
    """
    resized, hashes = Path(resized_dir), hashes or HashCache()
    files = _read_manifest(resized)
    backend = captioner_class(config)
    context = {"dataset": dataset, "trigger": trigger}
    cache = CaptionCache(
        cache_dir, captioner_key(backend.name, backend.options, dict(config), context, hashes)
    )
    digests = {file: _digest(resized, file, hashes) for file in files}
    captions = {file: cache.get(digests[file]) for file in files}
    todo = [file for file in files if captions[file] is None]
    if todo:
        captioner = make_captioner(config, dataset=dataset, trigger=trigger)
        for file, text in _caption_all(captioner, resized, todo):
            captions[file] = text
            cache.put(digests[file], text)
    model = config.get("model") if "model" in backend.options else None
    source = f"{backend.name}:{model}" if model else backend.name
    records = [
        {"image": f, "image_sha256": digests[f], "caption": captions[f], "source": source}
        for f in files
    ]
    write_jsonl(out_jsonl, records)
    hashes.save()
    log.info(
        "caption %s: %d captioned, %d reused",
        name or resized.parent.name,
        len(todo),
        len(files) - len(todo),
    )
    warn_if_uninformative(backend.name, [r["caption"] for r in records])


def warn_if_uninformative(backend: str, captions: list[str]) -> None:
    """Most captions the same (or empty): the captioner does not tell the images apart."""
    if backend == "none" or len(captions) < 4:
        return
    text, count = Counter(captions).most_common(1)[0]
    if count * 2 > len(captions):
        what = "empty" if not text else f"identical ({text!r})"
        log.warning(
            "%d of %d auto captions are %s: check caption.backend, or write caption edits",
            count,
            len(captions),
            what,
        )
