"""Verification of Flux.1 and Chroma exports, with the guarantees of the SD families' checks
(loramill.export.verify): each file is reloaded the way each of its clients loads it and
refused when anything would be lost or land at another strength.

- the clients of each file: the kohya file (and every step's) is for ComfyUI and Forge
  (ComfyUI's loader), kohya sd-scripts (``networks/lora_flux.py``) and diffusers; the diffusers
  file for diffusers and ComfyUI. AUTOMATIC1111 has no Flux.
- diffusers: the pipeline's own ``load_lora_weights`` must give every module of the file a
  LoRA layer, and no layer more, at the trained delta. Its kohya converter
  (``_convert_kohya_flux_lora_to_diffusers``) splits a single block's ``linear1`` at FLUX.1's
  sizes (3072, 3072, 3072, 12288, an assertion) and reads 19 double and 38 single blocks by
  number: it loads kohya files of FLUX.1's (and Chroma's) width and fails on any other, so on
  another width the kohya file's diffusers load is not checked (said in the log). With its
  ``lora_up`` exactly block-diagonal (loramill.export.flux.kohya) it takes each fused module
  apart into its parts at the trained scale; it drops T5 (``lora_te3_``) keys with only a
  warning, which is why the export refuses to write any.
- ComfyUI (loramill.export.flux.client_rules) and kohya sd-scripts (a module for each Linear
  of the BFL blocks and of CLIP-L's attention and MLP; other keys dropped): every key read,
  and each BFL module changed by its parts' trained deltas, alpha / rank · B @ A, stacked by
  rows;
- the module counts must be those the configured network (``train_blocks`` included) puts on
  this base model;
- at strength 0 the transformer's output must be the base model's, bit for bit (with the
  adapter diffusers loaded).

Only what the checks read is loaded: the transformer, and CLIP-L when its LoRA was trained;
never T5 (no T5 LoRA is exported) nor the VAE. In float32: peft gives loaded LoRA layers their
base layer's dtype, and a bfloat16 base would round the factors the checks compare. At full
size the job holds FLUX.1's transformer (11.9 B parameters, 47.6 GB in float32; Chroma's 8.9 B,
35.6 GB) and CLIP-L (123 M, 0.5 GB); T5-XXL (4.8 B, 19 GB) and the VAE stay on disk.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loramill import LoramillError
from loramill.export.client_rules import (
    Applied,
    Load,
    check_lands,
    comfyui_load,
    kohya_targets,
    named_load,
    tolerance,
    trained_modules,
)
from loramill.export.flux.client_rules import clip_target, comfyui_key_map, joined, part_targets
from loramill.export.flux.write import DENOISER, FluxBase
from loramill.export.verify import (
    ADAPTER,
    check_counts,
    check_same_modules,
    check_strength_zero,
    file_format,
    remove_adapter,
)
from loramill.models.checkpoint import read_checkpoint
from loramill.models.flux.layout import bfl_modules, kohya_name
from loramill.models.kohya_names import TE_ROOT, KohyaNames
from loramill.models.network import PEFT_PARTS, network_modules

log = logging.getLogger(__name__)
CLIENTS = {
    "kohya": ("diffusers", "ComfyUI", "kohya sd-scripts"),
    "diffusers": ("diffusers", "ComfyUI"),
}
LOADABLE = (DENOISER, "text_encoder")  # the components diffusers' Flux loader fills
# The widths diffusers' kohya Flux converter is written for: FLUX.1's hidden size, blocks
DIFFUSERS_KOHYA = {"width": 3072, "num_layers": 19, "num_single_layers": 38}


def load_flux_base(spec: str, allow_unsafe_weights: bool, encoders: tuple[str, ...]) -> Any:
    """The base model's pipeline with only the transformer and ``encoders`` loaded, in
    float32 (the module docstring says why, and what that holds at full size)."""
    from loramill.models.base_model import base_family, load_pipeline

    code = base_family(spec)
    skipped = {"vae", *code.tokenizers, *(e for e in code.text_encoders if e not in encoders)}
    return load_pipeline(spec, "float32", allow_unsafe_weights, skip=skipped)


def _linears(model: Any) -> dict[str, torch.nn.Module]:
    """A model's Linear layers by path (peft's wrappers stand for the layer they wrap)."""
    return {
        path: module
        for path, module in model.named_modules()
        if isinstance(getattr(module, "base_layer", module), torch.nn.Linear)
        and not PEFT_PARTS & set(path.split("."))
    }


class FluxClients:
    """Each client's rules for one Flux-family base model, and what each one loads of a
    file. Module identities: diffusers' module paths by component (CLIP-L's without
    ``text_model.``); the other clients' targets: BFL modules and ComfyUI's CLIP-L modules."""

    def __init__(self, pipe: Any, trained: set[str]) -> None:
        self.pipe, self.base = pipe, FluxBase.of(pipe)
        self.models = {c: getattr(pipe, c) for c in (DENOISER, *sorted(trained - {DENOISER}))}
        # what the pipeline's loader can put a LoRA in (FluxLoraLoaderMixin's loadable modules)
        self.loadable = {c: getattr(pipe, c) for c in LOADABLE if getattr(pipe, c) is not None}
        config, linears = self.base.config, _linears(pipe.transformer)
        sizes = {name: layer.out_features for name, layer in linears.items()}
        self.parts = part_targets(config, sizes)
        fused = bfl_modules(config)
        self.rows = {bfl: sum(sizes[p] for p in parts) for bfl, parts in fused.items()}
        self.names = KohyaNames(self.base.family.name)
        self.kohya = {kohya_name(bfl): (DENOISER, parts) for bfl, parts in fused.items()}
        self.targets = {kohya_name(bfl): bfl for bfl in fused}  # kohya sd-scripts' modules
        clip = self.models.get("text_encoder")
        layers = clip.config.num_hidden_layers if clip is not None else 0
        self.key_map = comfyui_key_map(config, sizes, layers)
        if clip is not None:
            for path in _linears(clip):
                name = self.names.module("text_encoder", path)
                self.kohya[name] = ("text_encoder", (path.removeprefix(TE_ROOT),))
            # (kohya_targets also names a wrapped layer's base_layer: no module of its own)
            clip_modules = kohya_targets({"text_encoder": clip}, self.names) & set(self.kohya)
            self.targets |= {n: clip_target(self.kohya[n][1][0]) for n in clip_modules}
        width = config["num_attention_heads"] * config["attention_head_dim"]
        self.diffusers_reads_kohya = width == DIFFUSERS_KOHYA["width"] and all(
            config[key] <= DIFFUSERS_KOHYA[key] for key in ("num_layers", "num_single_layers")
        )

    def modules(self, tensors: dict[str, Any]) -> dict[str, set[str]]:
        """The file's LoRA modules by component, as diffusers module paths: a fused kohya
        module counts as its parts, a key of no known module by its own name."""
        found: dict[str, set[str]] = {c: set() for c in self.models}
        for key in (k for k in tensors if not k.endswith(".alpha")):
            if key.startswith("lora_"):  # kohya's spelling: the module name before the dot
                name = key.split(".", 1)[0]
                # a name of no module: its component by its prefix (another family's: its own)
                other = self.names.component_of(name) or "_".join(name.split("_")[:2])
                component, paths = self.kohya.get(name, (other, (name,)))
            else:
                component, _, path = key.rsplit(".lora_", 1)[0].partition(".")
                paths = (path.removeprefix(TE_ROOT),)
            found.setdefault(component, set()).update(paths)
        return found

    def of(self, file_kind: str) -> list[str]:
        """The clients of a file of this format whose loading applies to this base model."""
        skip = file_kind == "kohya" and not self.diffusers_reads_kohya
        return [c for c in CLIENTS[file_kind] if not (skip and c == "diffusers")]

    def load(self, client: str, path: Path, tensors: dict[str, Any]) -> Load:
        if client == "diffusers":
            return self._diffusers(path, tensors), []
        if client == "kohya sd-scripts":
            applied, unread = named_load(tensors, self.targets.get)
        else:
            applied, unread = comfyui_load(tensors, self.key_map)
        return joined(applied, self.rows), unread

    def _diffusers(self, path: Path, tensors: dict[str, Any]) -> Applied:
        """Load ``path`` with the pipeline's loader; every module of the file must land."""
        try:
            self.pipe.load_lora_weights(str(path), adapter_name=ADAPTER)
        except (AssertionError, ValueError, KeyError, RuntimeError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            raise LoramillError(
                f"{path}: diffusers cannot load it ({reason or type(error).__name__})"
            ) from None
        from peft.tuners.lora import LoraLayer

        loaded = {
            component: {
                name.removeprefix(TE_ROOT): layer
                for name, layer in model.named_modules()
                if isinstance(layer, LoraLayer) and ADAPTER in layer.lora_A
            }
            for component, model in self.models.items()
        }
        check_same_modules(path, self.modules(tensors), loaded)
        return {
            f"{component}.{name}": (layer.lora_B[ADAPTER].weight.detach(),
                                    layer.lora_A[ADAPTER].weight.detach(),
                                    float(layer.scaling[ADAPTER]))
            for component, layers in loaded.items()
            for name, layer in layers.items()
        }  # fmt: skip

    def expected(self, client: str, trained: dict[tuple[str, str], Any]) -> Applied:
        """The trained modules by the names of the modules the client must land them on."""
        out = {}
        for (component, module), value in trained.items():
            module = module.removeprefix(TE_ROOT)
            if client == "diffusers":
                out[f"{component}.{module}"] = value
            elif component == DENOISER:
                out[self.parts.get(module, f"{component}.{module}")] = value
            else:
                out[clip_target(module)] = value
        return out if client == "diffusers" else joined(out, self.rows)


def flux_probe(pipe: Any) -> Callable[[Any], torch.Tensor]:
    """The transformer's output on a fixed small input (seeded), made as training makes it
    (the family's denoiser_inputs), for the strength-0 comparison."""
    family, config = FluxBase.of(pipe).family, pipe.transformer.config
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(1, config.in_channels // 4, 4, 4, generator=generator)
    text = {"hidden": torch.randn(1, 4, config.joint_attention_dim, generator=generator)}
    text["mask"] = torch.ones(1, 4, dtype=torch.long)  # Chroma's
    if config.get("pooled_projection_dim"):  # FLUX.1's CLIP-L
        text["pooled"] = torch.randn(1, config.pooled_projection_dim, generator=generator)
    inputs = family.denoiser_inputs(text, latents, torch.tensor([0.5]), 3.5)

    def probe(transformer: Any) -> torch.Tensor:
        with torch.no_grad():
            return transformer(**inputs).sample

    return probe


def verify_flux_exports(
    exports: dict[Path, Path], pipe: Any, trained: set[str], target: str, train_blocks: str
) -> None:
    """Run every check on each export (file → the checkpoint it was exported from); raise on
    the first failure. ``pipe``: the base model (load_flux_base); ``trained``: the components
    the run trained; ``target`` and ``train_blocks``: the network the run trained."""
    clients = FluxClients(pipe, trained)
    expected = {
        c: len(network_modules(m, c, target, train_blocks)) if c in trained else 0
        for c, m in clients.models.items()
    }
    network = target if train_blocks == "all" else f"{target} (train_blocks {train_blocks})"
    if not clients.diffusers_reads_kohya:
        log.info("not FLUX.1's width: the kohya files' load in diffusers is not checked")
    probe = flux_probe(pipe)
    base, sources = probe(pipe.transformer), {}
    for path, source in exports.items():
        if source not in sources:
            sources[source] = trained_modules(read_checkpoint(source))
        tensors = read_checkpoint(path).tensors  # read once for every check
        check_counts(path, clients.modules(tensors), expected, network)
        names = clients.of(file_format(tensors))
        try:
            for client in names:
                loaded = clients.load(client, path, tensors)
                want = clients.expected(client, sources[source])
                check_lands(path, client, loaded, want, tolerance(tensors))
            if "diffusers" in names:  # strength 0 is a loaded adapter's (without one: vacuous)
                check_strength_zero(path, pipe.transformer, base, probe, "transformer")
        finally:
            remove_adapter(clients.loadable)
        counts = ", ".join(f"{n} {c} modules" for c, n in expected.items())
        log.info("%s: %s at the trained scale in %s", path, counts, ", ".join(names))


def flux_verifier(
    base_model: str, allow_unsafe_weights: bool, cfg: Any
) -> tuple[dict[str, Any], Callable[[dict[Path, Path]], None]]:
    """The export options and the verification of a run on a Flux-family base
    (loramill.export.job.export_and_verify)."""
    from loramill.models.base_model import base_family

    encoders = base_family(base_model).trainable_encoders if cfg.train_text_encoder else ()
    pipe = load_flux_base(base_model, allow_unsafe_weights, encoders)
    trained = {DENOISER, *encoders}

    def verify(exports: dict[Path, Path]) -> None:
        verify_flux_exports(exports, pipe, trained, cfg.network_target, cfg.train_blocks)

    return {"flux": FluxBase.of(pipe)}, verify
