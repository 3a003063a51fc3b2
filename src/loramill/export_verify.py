"""Export verification: every export is reloaded the way users load it, and refused when
anything would be lost.

- diffusers: ``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder``
  (what ``pipe.load_lora_weights`` does) must give every module of the file a LoRA layer holding
  the file's weights, and no layer more;
- AUTOMATIC1111 and ComfyUI: every kohya module must map, by each tool's rule, to a module of
  the original SD layout (loramill.compvis_names; SD1.x text encoders, every UNet);
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
from loramill.compvis_names import LdmLayout
from loramill.kohya_names import KOHYA_PREFIXES, kohya_module
from loramill.lora import COMPONENTS, read_checkpoint
from loramill.network import network_modules

log = logging.getLogger(__name__)
ADAPTER = "loramill_verify"


def module_of(key: str) -> tuple[str, str]:
    """(component, kohya module name) of an export's tensor key, in either format."""
    if key.startswith(tuple(KOHYA_PREFIXES.values())):
        name = key.split(".", 1)[0]
        return "unet" if name.startswith(KOHYA_PREFIXES["unet"]) else "text_encoder", name
    component, _, rest = key.partition(".")
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
    from peft.tuners.lora import LoraLayer

    found: dict[str, dict[str, Any]] = {}
    for component, model in models.items():
        layers = {}
        for name, layer in model.named_modules():
            if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A:
                layers[kohya_module(component, name)] = layer
        found[component] = layers
    return found


def check_diffusers_load(path: Path, tensors: dict[str, Any], models: dict[str, Any]) -> None:
    """Load ``path`` as diffusers does; every module of ``tensors`` (the file's) must land,
    with the file's weights."""
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
    down = {module_of(k)[1]: t for k, t in tensors.items()
            if k.endswith((".lora_down.weight", ".lora_A.weight"))}  # fmt: skip
    for layers in loaded.values():
        for name, layer in layers.items():
            weight = layer.lora_A[ADAPTER].weight.detach().cpu()
            if not torch.equal(weight, down[name].to(weight.dtype)):
                raise LoramillError(f"{path}: {name} loaded other weights than the file holds")


def check_tool_names(
    path: Path, modules: dict[str, set[str]], layout: LdmLayout, text_encoder: bool
) -> None:
    """Every kohya module (``modules``: the file's) maps to an LDM module by A1111's and
    ComfyUI's rules. Text-encoder modules only for SD1.x's CLIP-L (``text_encoder``): SD2's
    OpenCLIP has other rules."""
    for name in sorted(modules["unet"] | (modules["text_encoder"] if text_encoder else set())):
        for tool, target in (("AUTOMATIC1111", layout.a1111), ("ComfyUI", layout.comfyui)):
            if target(name) is None:
                raise LoramillError(f"{path}: {tool} maps '{name}' to no module; it would skip it")


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


def verify_exports(
    paths: list[Path], unet: Any, text_encoder: Any, target: str, trained: set[str]
) -> None:
    """Run every check on each export; raise on the first failure."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    models = {"unet": unet, "text_encoder": text_encoder}
    expected = {
        c: len(network_modules(m, c, target)) if c in trained else 0 for c, m in models.items()
    }
    sd1 = text_encoder.config.hidden_size == 768  # CLIP-L
    layout = LdmLayout(unet.config, text_encoder.config.num_hidden_layers)
    # A1111's rules assume SD's block layout; no checkpoint of another layout exists for it
    standard = unet.config.layers_per_block == 2 and len(unet.config.block_out_channels) == 4
    if not standard:
        log.info("not the SD1.x/2.x UNet layout: A1111 and ComfyUI names not checked")
    base = probe(unet)
    for path in paths:
        tensors = read_checkpoint(path).tensors  # read once for every check
        modules = file_modules(tensors)
        check_counts(path, modules, expected, target)
        if standard:
            check_tool_names(path, modules, layout, sd1)
        check_diffusers_load(path, tensors, models)
        check_strength_zero(path, unet, base)
        unet.delete_adapters(ADAPTER)
        if ADAPTER in getattr(text_encoder, "peft_config", {}):
            delete_adapter_layers(text_encoder, ADAPTER)  # and its config
        log.info("%s: %s", path, ", ".join(f"{n} {c} modules" for c, n in expected.items()))


def step_export_name(name: str, checkpoint: Path) -> str:
    """``<ds>-NNNNNN.safetensors`` (kohya's naming of intermediate saves) for checkpoint
    ``step-NNNNNN.safetensors``: distinct names when several land in one models/Lora/."""
    return f"{name}-{checkpoint.name.removeprefix('step-')}"


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
    from loramill.export import export_adapter
    from loramill.lora import list_checkpoints
    from loramill.model import load_pipeline
    from loramill.model_card import write_model_card
    from loramill.train_config import TrainConfig

    checkpoints, precision = list_checkpoints(checkpoints_dir), export["save_precision"]
    export_adapter(checkpoints[-1], kohya_path, diffusers_path, output_name, precision)
    paths = [Path(kohya_path), Path(diffusers_path)]
    for checkpoint in checkpoints:  # picking the best step from the grid is what users do next
        paths.append(Path(steps_dir) / step_export_name(output_name, checkpoint))
        export_adapter(checkpoint, paths[-1], None, output_name, precision)
    cfg = TrainConfig.from_dict(train)
    trained = {"unet", "text_encoder"} if cfg.train_text_encoder else {"unet"}
    pipe = load_pipeline(base_model, "float32", allow_unsafe_weights)
    verify_exports(paths, pipe.unet, pipe.text_encoder, cfg.network_target, trained)
    grid = os.path.relpath(Path("grids") / f"{output_name}.png", Path(card_path).parent)
    write_model_card(kohya_path, card_path, output_name, grid)
