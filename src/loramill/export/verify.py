"""Export verification: every export is reloaded the way each of its clients loads it, and
refused when anything would be lost or land at another strength.

- the clients of each file: the kohya file (and every step's) is for diffusers, AUTOMATIC1111,
  ComfyUI and kohya sd-scripts; the diffusers file for diffusers and ComfyUI;
- diffusers: ``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder``
  (what ``pipe.load_lora_weights`` does) must give every module of the file a LoRA layer, and
  no layer more;
- every client, diffusers' real loader and the others' rules (export.client_rules; A1111
  and ComfyUI on the SD1.x/2.x UNet layout, their text-encoder rules for SD1.x's CLIP-L), must
  read every key and apply each trained module to the module it was trained on with the
  checkpoint's delta, alpha / rank · B @ A;
- the module counts must be those the configured network puts on this base model;
- at strength 0 the UNet's output must be the base model's, bit for bit.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from loramill import LoramillError
from loramill.export.client_rules import (
    Applied,
    check_lands,
    comfyui_load,
    kohya_targets,
    named_load,
    tolerance,
    trained_modules,
)
from loramill.export.ldm_names import LdmLayout
from loramill.models.checkpoint import COMPONENTS, STEP_PREFIX, read_checkpoint
from loramill.models.diffusers_names import checkpoint_key
from loramill.models.kohya_names import KOHYA_PREFIXES, kohya_module, loaded_lora_modules
from loramill.models.network import network_modules

log = logging.getLogger(__name__)
ADAPTER = "loramill_verify"


def module_of(key: str) -> tuple[str, str]:
    """(component, kohya module name) of an export's tensor key, in either format."""
    if key.startswith(tuple(KOHYA_PREFIXES.values())):
        name = key.split(".", 1)[0]
        return "unet" if name.startswith(KOHYA_PREFIXES["unet"]) else "text_encoder", name
    component, _, rest = checkpoint_key(key).partition(".")
    module = rest.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
    return component, kohya_module(component, module)


def file_modules(tensors: dict[str, Any]) -> dict[str, set[str]]:
    """The LoRA modules of an export's tensors, by component, in kohya spelling."""
    modules: dict[str, set[str]] = {c: set() for c in COMPONENTS}
    for key in tensors:
        if not key.endswith(".alpha"):
            component, name = module_of(key)
            modules[component].add(name)
    return modules


def loaded_modules(models: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The verification adapter's LoRA layers in the models: kohya name → layer."""
    return loaded_lora_modules(models, ADAPTER)


def check_diffusers_load(path: Path, tensors: dict[str, Any], models: dict[str, Any]) -> Applied:
    """Load ``path`` as diffusers does; every module of ``tensors`` (the file's) must land.
    Returns what the loaded layers apply, by kohya name."""
    from diffusers import StableDiffusionPipeline as Loader

    state, alphas, metadata = Loader.lora_state_dict(str(path), return_lora_metadata=True)
    Loader.load_lora_into_unet(
        state, alphas, models["unet"], adapter_name=ADAPTER, metadata=metadata
    )
    if any(key.startswith("text_encoder.") for key in state):
        Loader.load_lora_into_text_encoder(
            state, alphas, models["text_encoder"], prefix="text_encoder",
            adapter_name=ADAPTER, metadata=metadata,
        )  # fmt: skip
    in_file, loaded = file_modules(tensors), loaded_modules(models)
    for component in COMPONENTS:
        missing = sorted(in_file[component] - set(loaded[component]))
        extra = sorted(set(loaded[component]) - in_file[component])
        if missing or extra:
            first = (missing or extra)[0]
            raise LoramillError(
                f"{path}: diffusers left {len(missing)} {component} LoRA modules unloaded and "
                f"made {len(extra)} it does not hold (first: {first})"
            )
    return {
        name: (layer.lora_B[ADAPTER].weight.detach(), layer.lora_A[ADAPTER].weight.detach(),
               float(layer.scaling[ADAPTER]))
        for layers in loaded.values()
        for name, layer in layers.items()
    }  # fmt: skip


def check_counts(
    path: Path, modules: dict[str, set[str]], expected: dict[str, int], target: str
) -> None:
    """The file holds exactly the modules the configured network trains on this base."""
    counts = Counter({c: len(m) for c, m in modules.items()})
    for component, count in expected.items():
        if counts[component] != count:
            raise LoramillError(
                f"{path}: {counts[component]} {component} LoRA modules; network_target "
                f"{target} on this base model has {count}"
            )


def probe(unet: Any) -> torch.Tensor:
    """The UNet's output on a fixed small input (seeded), for the strength-0 comparison."""
    generator = torch.Generator().manual_seed(0)
    channels, width = unet.config.in_channels, unet.config.cross_attention_dim
    sample = torch.randn(1, channels, 8, 8, generator=generator)
    hidden = torch.randn(1, 8, width, generator=generator)
    with torch.no_grad():
        return unet(sample, 10, hidden).sample


def check_strength_zero(path: Path, unet: Any, base: torch.Tensor) -> None:
    unet.set_adapters([ADAPTER], weights=[0.0])
    if not torch.equal(probe(unet), base):
        raise LoramillError(f"{path}: at strength 0 the UNet's output is not the base model's")


# the clients each export is for, by its format
CLIENTS = {
    "kohya": ("diffusers", "AUTOMATIC1111", "ComfyUI", "kohya sd-scripts"),
    "diffusers": ("diffusers", "ComfyUI"),
}
LDM_TOOLS = ("AUTOMATIC1111", "ComfyUI")  # they apply LoRAs to the original (LDM) layout


def file_format(tensors: dict[str, Any]) -> str:
    """``kohya`` when every key has a kohya prefix (as diffusers decides), else ``diffusers``."""
    kohya = all(key.startswith(tuple(KOHYA_PREFIXES.values())) for key in tensors)
    return "kohya" if kohya else "diffusers"


class Clients:
    """Each client's rules for one base model, and what each one loads of a file."""

    def __init__(self, models: dict[str, Any]) -> None:
        unet, text_encoder = models["unet"], models["text_encoder"]
        self.models = models
        self.kohya = kohya_targets(models)
        self.layout = LdmLayout(unet.config, text_encoder.config.num_hidden_layers)
        # A1111's rules assume SD's block layout; no checkpoint of another layout exists for it
        config = unet.config
        self.standard = config.layers_per_block == 2 and len(config.block_out_channels) == 4
        self.sd1 = text_encoder.config.hidden_size == 768  # CLIP-L: the tools' CLIP rules

    def of(self, file_kind: str) -> list[str]:
        """The clients of a file of this format whose rules apply to this base model."""
        return [c for c in CLIENTS[file_kind] if self.standard or c not in LDM_TOOLS]

    def _checked(self, client: str, component: str) -> bool:
        return client not in LDM_TOOLS or component == "unet" or self.sd1

    def load(self, client: str, path: Path, tensors: dict[str, Any]) -> tuple[Applied, list[str]]:
        if client == "diffusers":
            return check_diffusers_load(path, tensors, self.models), []
        if client == "kohya sd-scripts":
            return named_load(tensors, lambda name: name if name in self.kohya else None)
        tensors = {k: t for k, t in tensors.items() if self._checked(client, module_of(k)[0])}
        if client == "AUTOMATIC1111":
            return named_load(tensors, self.layout.a1111)
        return comfyui_load(tensors, self.layout.comfyui_keys)

    def expected(self, client: str, trained: dict[tuple[str, str], Any]) -> Applied:
        """The trained modules by the names of the modules the client must land them on."""
        out = {}
        for (component, module), value in trained.items():
            if not self._checked(client, component):
                continue
            target = kohya_module(component, module)
            if client in LDM_TOOLS:  # from the layout itself, not from the tool's name rule
                target = self.layout.ldm_module(component, module) or f"{component}.{module}"
            out[target] = value
        return out


def verify_exports(
    exports: dict[Path, Path], unet: Any, text_encoder: Any, target: str, trained: set[str]
) -> None:
    """Run every check on each export (file → the checkpoint it was exported from); raise on
    the first failure."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    models = {"unet": unet, "text_encoder": text_encoder}
    expected = {
        c: len(network_modules(m, c, target)) if c in trained else 0 for c, m in models.items()
    }
    clients = Clients(models)
    if not clients.standard:
        log.info("not the SD1.x/2.x UNet layout: A1111 and ComfyUI names not checked")
    base, sources = probe(unet), {}
    for path, source in exports.items():
        if source not in sources:
            sources[source] = trained_modules(read_checkpoint(source))
        tensors = read_checkpoint(path).tensors  # read once for every check
        check_counts(path, file_modules(tensors), expected, target)
        names = clients.of(file_format(tensors))
        try:
            for client in names:
                loaded = clients.load(client, path, tensors)
                want = clients.expected(client, sources[source])
                check_lands(path, client, loaded, want, tolerance(tensors))
            check_strength_zero(path, unet, base)
        finally:  # the models stay the base model's, whatever failed
            if ADAPTER in getattr(unet, "peft_config", {}):
                unet.delete_adapters(ADAPTER)
            if ADAPTER in getattr(text_encoder, "peft_config", {}):
                delete_adapter_layers(text_encoder, ADAPTER)  # and its config
        counts = ", ".join(f"{n} {c} modules" for c, n in expected.items())
        log.info("%s: %s at the trained scale in %s", path, counts, ", ".join(names))


def step_export_name(name: str, checkpoint: Path) -> str:
    """``<ds>-NNNNNN.safetensors`` (kohya's naming of intermediate saves) for checkpoint
    ``step-NNNNNN.safetensors``: distinct names when several land in one models/Lora/."""
    return f"{name}-{checkpoint.name.removeprefix(STEP_PREFIX)}"


def export_and_verify(
    checkpoints_dir: str | os.PathLike,
    kohya_path: str | os.PathLike,
    diffusers_path: str | os.PathLike,
    card_path: str | os.PathLike,
    steps_dir: str | os.PathLike,
    output_name: str,
    export: dict[str, Any],
    base_model: str,
    allow_unsafe_weights: bool,
    train: dict[str, Any],
) -> None:
    """The export job: both files of the last checkpoint and a kohya file of every
    checkpoint, their verification against the base model (a failure fails the job, and
    Snakemake removes the files), the model card."""
    from loramill.export.model_card import write_model_card
    from loramill.export.write import export_adapter
    from loramill.models.base_model import load_pipeline
    from loramill.models.checkpoint import list_checkpoints
    from loramill.train.config import TrainConfig

    checkpoints, precision = list_checkpoints(checkpoints_dir), export["save_precision"]
    export_adapter(checkpoints[-1], kohya_path, diffusers_path, output_name, precision)
    exports = {Path(kohya_path): checkpoints[-1], Path(diffusers_path): checkpoints[-1]}
    for checkpoint in checkpoints:  # picking the best step from the grid is what users do next
        path = Path(steps_dir) / step_export_name(output_name, checkpoint)
        export_adapter(checkpoint, path, None, output_name, precision)
        exports[path] = checkpoint
    cfg = TrainConfig.from_dict(train)
    trained = {"unet", "text_encoder"} if cfg.train_text_encoder else {"unet"}
    pipe = load_pipeline(base_model, "float32", allow_unsafe_weights)
    verify_exports(exports, pipe.unet, pipe.text_encoder, cfg.network_target, trained)
    grid = os.path.relpath(Path("grids") / f"{output_name}.png", Path(card_path).parent)
    write_model_card(kohya_path, card_path, output_name, grid)
