"""Export verification: every export is reloaded the way each of its clients loads it, and
refused when anything would be lost or land at another strength.

- the clients of each file: the kohya file (and every step's) is for diffusers, AUTOMATIC1111,
  ComfyUI and kohya sd-scripts; the diffusers file for diffusers and ComfyUI;
- diffusers: ``lora_state_dict`` + ``load_lora_into_unet`` / ``load_lora_into_text_encoder``
  (what the family's pipeline's ``load_lora_weights`` does, SDXL's with its UNet config and
  both encoders) must give every module of the file a LoRA layer, and no layer more;
- every client, diffusers' real loader and the others' rules (export.client_rules; A1111
  and ComfyUI on the LDM layout: loramill.export.ldm_names for SD1.x/2.x, whose text-encoder
  rules are checked for SD1.x's CLIP-L, .sdxl_layout for SDXL), must read every key and apply
  each trained module to the module it was trained on with the checkpoint's delta,
  alpha / rank · B @ A;
- the module counts must be those the configured network puts on this base model;
- at strength 0 the UNet's output must be the base model's, bit for bit.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from loramill import LoramillError
from loramill.export.client_rules import (
    Applied,
    a1111_load,
    check_lands,
    comfyui_load,
    kohya_targets,
    named_load,
    tolerance,
    trained_modules,
)
from loramill.export.ldm_names import LdmLayout
from loramill.export.sdxl_layout import SdxlLayout
from loramill.models.adapter_parts import network_type_of
from loramill.models.checkpoint import component_order, read_checkpoint
from loramill.models.diffusers_names import checkpoint_key
from loramill.models.families import DENOISERS
from loramill.models.kohya_names import (
    KOHYA_KEY_PREFIXES,
    KohyaNames,
    loaded_lora_modules,
    model_names,
)
from loramill.models.network import NetworkSpec, module_scales

log = logging.getLogger(__name__)
ADAPTER = "loramill_verify"


def module_of(key: str, names: KohyaNames) -> tuple[str, str]:
    """(component, kohya module name) of an export's tensor key, in either format."""
    if key.startswith(KOHYA_KEY_PREFIXES):
        name = key.split(".", 1)[0]
        # another family's prefix (lora_te_ in an SDXL file) counts as a component of its own
        return names.component_of(name) or "_".join(name.split("_")[:2]), name
    component, _, rest = checkpoint_key(key).partition(".")
    module = rest.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
    return component, kohya_name(names, component, module)


def kohya_name(names: KohyaNames, component: str, module: str) -> str:
    """A module's kohya name, or for one kohya has none for its path: the checks then report
    it as a module of no client's."""
    try:
        return names.module(component, module)
    except LoramillError:
        return f"{component}.{module}"


def file_modules(tensors: dict[str, Any], names: KohyaNames) -> dict[str, set[str]]:
    """The LoRA modules of an export's tensors, by component, in kohya spelling."""
    modules: dict[str, set[str]] = {c: set() for c in names.prefixes}
    for key in tensors:
        if not key.endswith(".alpha"):
            component, name = module_of(key, names)
            modules.setdefault(component, set()).add(name)
    return modules


def diffusers_load(path: Path, models: dict[str, Any]) -> None:
    """Load ``path`` into the models as the family's pipeline does."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    sdxl = "text_encoder_2" in models
    loader = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
    # SDXL's pipeline passes its UNet config: kohya's LDM block numbers are read by it
    options = {"unet_config": models["unet"].config} if sdxl else {}
    state, alphas, metadata = loader.lora_state_dict(
        str(path), return_lora_metadata=True, **options
    )
    loader.load_lora_into_unet(
        state, alphas, models["unet"], adapter_name=ADAPTER, metadata=metadata
    )
    for component in (c for c in models if c != "unet"):
        if any(key.startswith(f"{component}.") for key in state):
            loader.load_lora_into_text_encoder(
                state, alphas, models[component], prefix=component,
                adapter_name=ADAPTER, metadata=metadata,
            )  # fmt: skip


def check_same_modules(
    path: Path, in_file: dict[str, set[str]], loaded: Mapping[str, Collection[str]]
) -> None:
    """The modules diffusers gave a LoRA layer (``loaded``) are the file's, by component."""
    for component in sorted(set(in_file) | set(loaded), key=component_order):
        missing = sorted(in_file.get(component, set()) - set(loaded.get(component, {})))
        extra = sorted(set(loaded.get(component, {})) - in_file.get(component, set()))
        if missing or extra:
            first = (missing or extra)[0]
            raise LoramillError(
                f"{path}: diffusers left {len(missing)} {component} LoRA modules unloaded and "
                f"made {len(extra)} it does not hold (first: {first})"
            )


def check_diffusers_load(
    path: Path, tensors: dict[str, Any], models: dict[str, Any], names: KohyaNames
) -> Applied:
    """Load ``path`` as diffusers does; every module of ``tensors`` (the file's) must land.
    Returns what the loaded layers apply, by kohya name."""
    diffusers_load(path, models)
    loaded = loaded_lora_modules(models, ADAPTER, names)
    check_same_modules(path, file_modules(tensors, names), loaded)
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
    for component in sorted(set(expected) | set(counts), key=component_order):
        if counts[component] != expected.get(component, 0):
            raise LoramillError(
                f"{path}: {counts[component]} {component} LoRA modules; network_target "
                f"{target} on this base model has {expected.get(component, 0)}"
            )


def probe(unet: Any) -> torch.Tensor:
    """The UNet's output on a fixed small input (seeded), for the strength-0 comparison."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    sample = torch.randn(1, config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(1, 8, config.cross_attention_dim, generator=generator)
    extra = {}
    if config.addition_embed_type == "text_time":  # SDXL: pooled text and six size numbers
        time_ids = 6 * config.addition_time_embed_dim
        pooled = config.projection_class_embeddings_input_dim - time_ids
        added = {"text_embeds": torch.randn(1, pooled, generator=generator)}
        added["time_ids"] = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        extra["added_cond_kwargs"] = added
    with torch.no_grad():
        return unet(sample, 10, hidden, **extra).sample


def check_strength_zero(
    path: Path,
    model: Any,
    base: torch.Tensor,
    read: Callable[[Any], torch.Tensor] = probe,
    what: str = "UNet",
) -> None:
    """The denoiser's output with the adapter at strength 0 is ``base`` (the base model's
    output by ``read``), bit for bit."""
    model.set_adapters([ADAPTER], weights=[0.0])
    if not torch.equal(read(model), base):
        raise LoramillError(f"{path}: at strength 0 the {what}'s output is not the base model's")


# the clients each export is for, by its format. diffusers refuses a kohya file with LoHa or
# LoKr keys and drops DoRA's magnitudes, and kohya's networks.lora loads none of LoHa's and
# LoKr's modules and DoRA's as plain LoRA (its users load LyCORIS files through LyCORIS's own
# network module).
CLIENTS = {
    "kohya": ("diffusers", "AUTOMATIC1111", "ComfyUI", "kohya sd-scripts"),
    "lycoris": ("AUTOMATIC1111", "ComfyUI"),
    "diffusers": ("diffusers", "ComfyUI"),
}
LDM_TOOLS = ("AUTOMATIC1111", "ComfyUI")  # they apply LoRAs to the original (LDM) layout


def file_format(tensors: dict[str, Any]) -> str:
    """``kohya`` when every key has a kohya prefix (as diffusers decides), ``lycoris`` when
    such a file has LoHa, LoKr or DoRA modules, else ``diffusers``."""
    if not all(key.startswith(KOHYA_KEY_PREFIXES) for key in tensors):
        return "diffusers"
    return "kohya" if network_type_of(tensors) == "lora" else "lycoris"


class Clients:
    """Each client's rules for one base model, and what each one loads of a file."""

    def __init__(self, models: dict[str, Any]) -> None:
        unet, text_encoder = models["unet"], models["text_encoder"]
        self.models, self.names = models, model_names(models)
        self.kohya = kohya_targets(models, self.names)
        config = unet.config
        self.layout: LdmLayout | SdxlLayout
        if self.names.family == "sdxl":
            layers = [
                models[c].config.num_hidden_layers for c in ("text_encoder", "text_encoder_2")
            ]
            self.layout = SdxlLayout(config, *layers)
            # kohya's SDXL names are LDM names, which both tools look up in any layout
            self.standard = self.text_rules = True
        else:
            self.layout = LdmLayout(config, text_encoder.config.num_hidden_layers)
            # A1111's rules assume SD's block layout; no checkpoint of another exists for it
            self.standard = config.layers_per_block == 2 and len(config.block_out_channels) == 4
            self.text_rules = text_encoder.config.hidden_size == 768  # CLIP-L: SD1.x's

    def of(self, file_kind: str) -> list[str]:
        """The clients of a file of this format whose rules apply to this base model: A1111's
        UNet names assume SD's block layout, ComfyUI's key map is built from any UNet's
        config."""
        return [c for c in CLIENTS[file_kind] if self.standard or c != "AUTOMATIC1111"]

    def _checked(self, client: str, component: str) -> bool:
        return client not in LDM_TOOLS or component == "unet" or self.text_rules

    def load(self, client: str, path: Path, tensors: dict[str, Any]) -> tuple[Applied, list[str]]:
        if client == "diffusers":
            return check_diffusers_load(path, tensors, self.models, self.names), []
        if client == "kohya sd-scripts":
            return named_load(tensors, lambda name: name if name in self.kohya else None)
        tensors = {
            k: t for k, t in tensors.items() if self._checked(client, module_of(k, self.names)[0])
        }
        if client == "AUTOMATIC1111":
            return a1111_load(tensors, self.layout.a1111, self.layout.packed)
        return comfyui_load(tensors, self.layout.comfyui_keys)

    def expected(self, client: str, trained: dict[tuple[str, str], Any]) -> Applied:
        """The trained modules by the names of the modules the client must land them on."""
        out = {}
        for (component, path), value in trained.items():
            if not self._checked(client, component):
                continue
            module, part = path.split("#")[0], path[len(path.split("#")[0]) :]  # DoRA's magnitude
            if client in LDM_TOOLS:  # from the layout itself, not from the tool's name rule
                target = self.layout.ldm_module(component, module) or f"{component}.{module}"
            else:
                target = kohya_name(self.names, component, module)
            out[target + part] = value
        return out


def remove_adapter(models: dict[str, Any]) -> None:
    """The models back to the base model's, whatever a check left in them."""
    from diffusers.utils.peft_utils import delete_adapter_layers

    for component, model in models.items():
        if ADAPTER in getattr(model, "peft_config", {}):
            if component in DENOISERS:
                model.delete_adapters(ADAPTER)
            else:
                delete_adapter_layers(model, ADAPTER)  # and its config


def verify_exports(
    exports: dict[Path, Path],
    models: dict[str, Any],
    network: str | NetworkSpec,
    trained: set[str],
) -> None:
    """Run every check on each export (file → the checkpoint it was exported from); raise on
    the first failure. ``models``: the base model's UNet and text encoders by pipeline
    component name; ``network``: the network the run trained (or its target alone);
    ``trained``: the components the run trained."""
    unet = models["unet"]
    spec = network if isinstance(network, NetworkSpec) else NetworkSpec(network)
    target = spec.target
    expected = {c: len(module_scales(m, c, spec)) if c in trained else 0 for c, m in models.items()}
    clients = Clients(models)
    if not clients.standard:
        log.info("not the SD1.x/2.x UNet layout: A1111's names not checked")
    base, sources = probe(unet), {}
    for path, source in exports.items():
        if source not in sources:
            sources[source] = trained_modules(read_checkpoint(source))
        tensors = read_checkpoint(path).tensors  # read once for every check
        check_counts(path, file_modules(tensors, clients.names), expected, target)
        names = clients.of(file_format(tensors))
        try:
            for client in names:
                loaded = clients.load(client, path, tensors)
                want = clients.expected(client, sources[source])
                check_lands(path, client, loaded, want, tolerance(tensors))
            if "diffusers" in names:  # strength 0 is a loaded adapter's (without one: vacuous)
                check_strength_zero(path, unet, base)
        finally:
            remove_adapter(models)
        counts = ", ".join(f"{n} {c} modules" for c, n in expected.items())
        log.info("%s: %s at the trained scale in %s", path, counts, ", ".join(names))
