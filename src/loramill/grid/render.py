"""Rendering grid cells: the only part of the grid that needs a model.

The adapters are the export's kohya files (``exports/<ds>-steps/``), the files AUTOMATIC1111,
ComfyUI and diffusers users load, loaded as a diffusers user loads them: the grid shows what
they get. A LoHa's, LoKr's or DoRA's file, which diffusers does not load as trained, is
applied to the weights as AUTOMATIC1111 and ComfyUI apply it (loramill.grid.patched). A
FLUX.1 or Chroma adapter is a diffusers-format file (a training checkpoint:
``transformer.…`` and, where CLIP-L was trained, ``text_encoder.…`` tensors), drawn by
FluxPipeline or ChromaPipeline with the base model's flow-matching scheduler. The base
pipeline is loaded once per job, each step's LoRA once (strength changes through
set_adapters, no reload), and cells that differ only in prompt and seed share a pipeline
call. Every image is stored in a per-cell cache keyed by what it depends on — the base
model's loaded files, adapter tensors, every cell setting, and the rendering software — so a
grid with one more value renders only the new cells.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramill import LoramillError
from loramill.files import atomic_path
from loramill.grid.plan import Cell
from loramill.hashing import hash_value
from loramill.models.adapter_parts import network_type_of
from loramill.models.kohya_names import kohya_file_modules, loaded_lora_modules, model_names
from loramill.reruns.run_cache import human
from loramill.software import RENDERING, versions

if TYPE_CHECKING:
    from loramill.grid.patched import PatchedAdapter

CACHE_DIR = Path(".cache/grid")
# Bump when a change here alters the pixels of equal inputs.
RENDER_VERSION = 1


def adapter_hash(tensors: dict[str, Any]) -> str:
    """sha256 of an adapter's tensors (names, dtypes, shapes, bytes): what the cell shows. Not
    of the file: its metadata (the export's date) changes no pixel."""
    import torch

    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}\n".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def read_adapter(path: Path) -> dict[str, Any]:
    """The tensors of an adapter file (an export's kohya file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as error:
        raise LoramillError(f"{path}: cannot read adapter ({error})") from None


@dataclass(frozen=True)
class RenderContext:
    """What every cell of a job shares and its pixels depend on."""

    # base_model_fingerprint: the files the loader reads, as the stages name the base model
    base_model_hash: str
    dtype: str
    device: str  # "cpu" or "cuda": the same settings give other pixels on another device
    # a batch changes float rounding: cells drawn at another batch size are other pixels
    batch_size: int
    # The train options that decide how a prompt is read, as the config sets them, those of
    # the base model's family only (its conditioning's fields: SD's clip_skip and
    # max_token_length, Flux's t5xxl_max_token_length, where null is the family's default,
    # which the base model's hash fixes): the grid reads prompts as training read captions.
    text: dict[str, Any]

    def describe(self) -> dict[str, Any]:
        """The context as cell keys and grid descriptions hold it: the text options beside the
        others, so an SD grid's keys (and cached cells) are those it had before families."""
        shared = {name: value for name, value in self.__dict__.items() if name != "text"}
        return {**shared, **self.text}

    def software(self) -> dict[str, str]:
        return versions(RENDERING)  # read once per process

    def cell_key(self, cell: Cell, adapter: str | None) -> str:
        return hash_value(
            {
                "render": RENDER_VERSION,
                "context": self.describe(),
                "software": self.software(),
                "adapter": adapter if cell.uses_adapter else None,
                "cell": cell.settings(),
            }
        )


class CellCache:
    """One PNG per cell under ``.cache/grid/<key[:2]>/<key>.png``, written atomically."""

    def __init__(self, root: str | Path = CACHE_DIR) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def get(self, key: str) -> Any | None:
        """The cell's image, or None when it is gone or unreadable."""
        from PIL import Image

        try:
            with Image.open(self.path(key)) as image:
                image.load()
                return image.copy()
        except OSError:  # missing, or damaged (PIL's UnidentifiedImageError is an OSError)
            return None

    def has(self, key: str) -> bool:
        """Whether a readable cell is cached: the PNG header is checked, the pixels are read
        only when the page is composed. A damaged entry counts as missing (drawn again)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(self.path(key)):
                return True
        except FileNotFoundError:
            return False
        except (OSError, UnidentifiedImageError):
            logging.getLogger(__name__).warning("%s: unreadable cached cell, rendering it",
                                                self.path(key))  # fmt: skip
            return False

    def put(self, key: str, image: Any) -> None:
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp:
            image.save(tmp, format="PNG")

    def prune(self, keep: set[str], min_age_s: float = 3600) -> tuple[int, int]:
        """Remove the cells not in ``keep`` and older than ``min_age_s`` (a grid being drawn
        has cells no grids/*.json names yet); return (cells removed, bytes freed)."""
        removed = freed = 0
        for path in self.root.glob("*/*.png"):
            with contextlib.suppress(FileNotFoundError):  # another gc was first
                info = path.stat()
                if path.stem in keep or time.time() - info.st_mtime < min_age_s:
                    continue
                path.unlink()
                removed, freed = removed + 1, freed + info.st_size
        return removed, freed


def cells_in_use(grids: Path = Path("grids")) -> set[str]:
    """The cell keys today's grids (``grids/*.json``) are drawn from."""
    keys: set[str] = set()
    for description in grids.glob("*.json"):
        try:
            keys |= {cell["key"] for cell in json.loads(description.read_text())["cells"]}
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a grid description (or an old one): it keeps nothing
    return keys


@contextlib.contextmanager
def _quiet_adapter_loading() -> Iterator[None]:
    """Hide transformers' per-adapter "LOAD REPORT" and its progress bar.

    transformers 5 reports every frozen text-encoder weight as MISSING ("newly initialized")
    when diffusers loads a LoRA into it; that is false and alarming. Nothing is lost by hiding
    it: _check_loaded verifies that every module of the file landed. Only this one logger
    is raised to ERROR, and only while loading, so other warnings still reach the user.
    """
    from transformers.utils import logging as hf_logging

    logger = logging.getLogger("transformers.integrations.peft")
    level = logger.level
    bars = hf_logging.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            hf_logging.enable_progress_bar()


def _kohya_modules(
    models: dict[str, Any], adapter: str, tensors: dict[str, Any], path: Path
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """An SD or SDXL kohya file's LoRA modules and the adapter's layers, by component and
    kohya name."""
    names = model_names(models)
    in_file = kohya_file_modules(tensors, names)
    if not any(in_file.values()):
        prefixes = "/".join(f"{prefix}_" for prefix in names.prefixes.values())
        raise LoramillError(f"{path}: no {prefixes} modules (not a kohya LoRA file)")
    loaded = loaded_lora_modules(models, adapter, names)
    return in_file, {component: set(layers) for component, layers in loaded.items()}


def _diffusers_modules(
    models: dict[str, Any], adapter: str, tensors: dict[str, Any], path: Path
) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """A diffusers-format file's LoRA modules (``<component>.<module>.lora_A.weight``) and the
    adapter's layers, by component and module path: a Flux LoRA as loramill saves it."""
    from peft.tuners.lora import LoraLayer

    in_file: dict[str, set[str]] = {}
    for key in tensors:
        component, _, rest = key.partition(".")
        if key.startswith("lora_") or ".lora_" not in rest:
            # e.g. kohya's BFL layout, whose fused modules diffusers splits into their parts:
            # that every one lands is not verified yet, and an unverified load is not drawn
            raise LoramillError(
                f"{path}: '{key}' is not a diffusers-format LoRA key; the grid draws a Flux "
                "or Chroma adapter from its diffusers-format file (a training checkpoint)"
            )
        in_file.setdefault(component, set()).add(rest.split(".lora_", 1)[0])
    loaded = {
        component: {name for name, layer in model.named_modules()
                    if isinstance(layer, LoraLayer) and adapter in layer.lora_A}
        for component, model in models.items()
    }  # fmt: skip
    return in_file, loaded


def _check_loaded(pipe: Any, adapter: str, tensors: dict[str, Any], path: Path) -> None:
    """Refuse a silent partial load (DESIGN §5): every LoRA module of the file must be in use
    (diffusers drops modules that match none of the base model's without a word, and a
    component it does not load a LoRA into, such as Flux's T5, whole)."""
    from loramill.models.base_model import pipeline_family

    family = pipeline_family(pipe)
    components = (family.denoiser, *family.trainable_encoders)
    models = {component: getattr(pipe, component) for component in components}
    modules = _kohya_modules if family.denoiser == "unet" else _diffusers_modules
    in_file, loaded = modules(models, adapter, tensors, path)
    for component, wanted in in_file.items():
        missing = sorted(wanted - loaded.get(component, set()))
        if missing:
            raise LoramillError(
                f"{path}: {len(missing)} of {len(wanted)} {component} LoRA modules do not fit "
                f"the base model (first: {missing[0]})"
            )


class Renderer:
    """A pipeline on its device with at most one adapter loaded."""

    def __init__(self, pipe: Any, conditioning: Any) -> None:
        self.pipe, self.how = pipe, conditioning
        self.adapter: str | None = None
        self.patched: PatchedAdapter | None = None  # a LoHa's or LoKr's file
        self.base_scheduler = pipe.scheduler

    def use_adapter(self, step: int | None, path: Path | None) -> None:
        """Load one step's kohya file (None: the base model alone), dropping the previous
        one: a run may have dozens of checkpoints."""
        if self.patched is not None:
            self.patched.remove()
            self.patched = None
        if self.adapter is not None:
            self.pipe.delete_adapters(self.adapter)
            self.adapter = None
        if step is None or path is None:
            return
        tensors = read_adapter(path)
        if network_type_of(tensors) != "lora":
            self.patched = self._patched(tensors, path)
            return
        name = f"step{step}"
        try:
            with _quiet_adapter_loading():
                self.pipe.load_lora_weights(str(path), adapter_name=name)
        # AssertionError: diffusers' reader of kohya's Flux layout asserts FLUX.1's widths
        except (OSError, ValueError, RuntimeError, KeyError, AssertionError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise LoramillError(f"{path}: cannot load as a LoRA ({reason})") from None
        self.adapter = name
        _check_loaded(self.pipe, name, tensors, path)

    def _patched(self, tensors: dict[str, Any], path: Path) -> PatchedAdapter:
        """A LoHa, LoKr or DoRA file, which diffusers cannot load: applied to the weights."""
        from loramill.grid.patched import PatchedAdapter
        from loramill.models.base_model import pipeline_family

        family = pipeline_family(self.pipe)
        components = (family.denoiser, *family.trainable_encoders)
        models = {name: getattr(self.pipe, name) for name in components}
        return PatchedAdapter(models, family.denoiser, tensors, path)

    def render(self, cells: list[Cell]) -> list[Any]:
        """One pipeline call for cells of one batch group (see Cell.batch_group)."""
        import torch

        from loramill.models.base_model import pipeline_family

        first, family = cells[0], pipeline_family(self.pipe)
        if self.patched is not None:
            self.patched.apply(first.unet_strength, first.te_strength)
        if self.adapter is not None:
            # the components a LoRA loads into (not Flux's T5): diffusers warns of any other
            weights = {family.denoiser: first.unet_strength}
            weights |= {name: first.te_strength for name in family.trainable_encoders}
            self.pipe.set_adapters([self.adapter], adapter_weights=[weights])
        try:
            self.pipe.scheduler = (
                self.base_scheduler
                if first.sampler == "default"
                # kohya's names for SD (check_family refuses them for Flux)
                else family.sampler(first.sampler, self.base_scheduler)
            )
        except (LoramillError, ValueError, TypeError) as error:
            raise LoramillError(f"grid.sampler: {error}") from None
        # A CPU generator per cell: the same noise whatever the batch, order or device.
        generators = [torch.Generator(device="cpu").manual_seed(c.seed) for c in cells]
        prompts = [c.prompt for c in cells]
        negatives = [c.negative_prompt for c in cells]
        size = (first.resolution, first.resolution)
        arguments = family.prompt_arguments(self.pipe, prompts, negatives, self.how, size)
        return self.pipe(
            **arguments,
            num_inference_steps=first.num_inference_steps,
            guidance_scale=first.guidance_scale,
            height=size[0],
            width=size[1],
            generator=generators,
        ).images


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loramill.grid.render")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("gc", help="remove cached grid cells no grid in grids/ shows")
    parser.parse_args(argv)
    removed, freed = CellCache().prune(cells_in_use())
    print(f"grid cells: {removed} removed ({human(freed)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
