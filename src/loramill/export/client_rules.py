"""How each client loads an export, written from the clients' own loaders, and the check that
every trained module lands where it was trained, at the strength it was trained.

A client's load is an ``Applied`` — target module → (up, down, scale): the client adds
``scale · up @ down`` (conv pairs flattened) to that module's weight — and the file's keys it
leaves unread, which it skips with at most a log line:

- ComfyUI (``comfy/lora.py`` ``load_lora`` and ``model_lora_keys_*``, ``comfy/weight_adapter/
  lora.py``): for every key of the model's key map (loramill.export.ldm_names.LdmLayout), the
  first LoRA spelling present; alpha only from a ``<key>.alpha`` tensor (scale alpha / rank),
  scale 1.0 without one; every other key is "lora key not loaded".
- AUTOMATIC1111 (``extensions-builtin/Lora``: ``networks.load_network``, ``network_lora``):
  keys grouped by the name before the first dot, the name converted by its rule and looked up
  among the LDM modules; ``lora_up`` / ``lora_down`` / ``alpha``, scale alpha / dim (dim:
  ``lora_down``'s rows), 1.0 without alpha; unmatched names are only logged. A packed
  attention (OpenCLIP's, SDXL's second encoder) is changed only when the file has a LoRA for
  each of its q, k, v and out projections (``network_apply_weights``).
- kohya sd-scripts (``networks/lora.py`` ``create_network_from_weights``): the same grouping;
  dim from ``lora_down``, alpha from ``.alpha`` or else the dim (scale 1); a module exists
  only for the names its network gives the Linear and Conv2d layers of its target blocks (on
  SDXL, in its own LDM-layout UNet: loramill.models.kohya_names), and
  ``load_state_dict(strict=False)`` drops every other key silently. (On SDXL it first
  renames diffusers-layout UNet names to its own, ``convert_diffusers_to_sai_if_needed``;
  exports hold kohya's own names only, so that rename is not modelled: such a name counts
  as lost.)
- diffusers: its real loader (loramill.export.verify).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from loramill import LoramillError
from loramill.export.ldm_names import CLIP_LAYER_PARTS
from loramill.models.adapter_parts import HADA, LOKR, client_dim, kohya_groups
from loramill.models.checkpoint import Checkpoint, module_alpha, module_rank
from loramill.models.dora import column_norms

if TYPE_CHECKING:
    from loramill.models.kohya_names import KohyaNames

# (up, down, scale): a LoRA pair, or a LoHa's or LoKr's whole delta (out, in·kh·kw) and None
Landed = tuple[torch.Tensor, torch.Tensor | None, float]
DORA = "#dora_scale"  # a DoRA module's magnitude, checked as a module of its own
Applied = dict[str, Landed]
Load = tuple[Applied, list[str]]

# (up, down) spellings in the order comfy/weight_adapter/lora.py tries them
COMFYUI_SPELLINGS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_B", ".lora_A"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
# kohya's LoRANetwork target blocks (UNET_TARGET_REPLACE_MODULE + the 3×3-conv ones that
# create_network_from_weights adds; TEXT_ENCODER_TARGET_REPLACE_MODULE)
KOHYA_BLOCKS = {
    "unet": ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"),
    "text_encoder": ("CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"),
}
COMFYUI_CLIP_LAYERS = 32  # comfy/lora.py maps the layers of range(32)


def comfyui_load(tensors: dict[str, torch.Tensor], key_map: dict[str, str]) -> Load:
    """What ComfyUI applies of a file, with a model whose key map is ``key_map``."""
    applied: Applied = {}
    read: set[str] = set()
    for key, target in key_map.items():
        for up, down in COMFYUI_SPELLINGS:
            if key + up in tensors and key + down in tensors:
                alpha = tensors.get(key + ".alpha")
                rank = tensors[key + down].shape[0]
                scale = 1.0 if alpha is None else float(alpha) / rank
                applied[target] = (tensors[key + up], tensors[key + down], scale)
                read |= {key + up, key + down, key + ".alpha"}
                if key + ".dora_scale" in tensors:
                    magnitude = tensors[key + ".dora_scale"]
                    # ComfyUI's weight_decompose: per output row when the first axis is the
                    # weight's (and then over the base weight's norm), else per input column
                    output = magnitude.shape[0] == tensors[key + up].shape[0]
                    applied |= dora_landed(target, magnitude, "output rows" if output else "")
                    read.add(key + ".dora_scale")
                break
        else:
            parts = {p: tensors[f"{key}.{p}"] for p in (*HADA, *LOKR) if f"{key}.{p}" in tensors}
            if parts and (landed := lycoris_landed(parts, tensors.get(key + ".alpha"))):
                applied[target] = landed
                read |= {f"{key}.{part}" for part in (*parts, "alpha")}
    return applied, sorted(set(tensors) - read)


def dora_landed(target: str, magnitude: torch.Tensor, other_axis: str = "") -> Applied:
    """A DoRA module's magnitude as a client applies it, for the checks: under
    ``<target>#dora_scale`` when per input column as trained (loramill.models.dora), as a
    one-column "module" whose delta is the magnitude; under a name of its own when the client
    reads it on ``other_axis``, so the check reports it as landing nowhere it was trained."""
    suffix = f" ({other_axis})" if other_axis else ""
    column = magnitude.flatten().float().reshape(-1, 1)
    return {f"{target}{DORA}{suffix}": (column, torch.ones(1, 1), 1.0)}


def lycoris_landed(parts: dict[str, torch.Tensor], alpha: Any) -> Landed | None:
    """What ComfyUI and AUTOMATIC1111 apply of a LoHa or LoKr module (``parts``: its tensors
    by suffix; both read them alike): the whole delta (out, in·kh·kw) and its scale, the
    file's alpha over the module's dim, 1.0 without alpha or (LoKr) without a decomposed
    factor; None when the parts are neither's (the module is not loaded)."""
    made = lycoris_delta(parts)
    if made is None:
        return None
    delta, dim = made
    return delta, None, 1.0 if alpha is None or dim is None else float(alpha) / dim


def patched_weight(parts: dict[str, torch.Tensor], base: torch.Tensor, strength: float) -> Any:
    """The weight AUTOMATIC1111 and ComfyUI give a module at ``strength`` (``parts``: the
    file's tensors of the module by suffix; ``base``: its weight): base + strength × delta,
    the delta scaled by the file's alpha / dim; for DoRA the delta is
    (W + ΔW) · m / ‖W + ΔW‖ − W, the norm per input column (A1111's
    ``apply_weight_decompose``; ComfyUI's input-axis branch adds a float eps to the norm)."""
    alpha = parts.get("alpha")
    if "lora_down.weight" in parts:
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        delta = scale * (up.flatten(1) @ down.flatten(1))
    else:
        delta, _, scale = lycoris_landed(parts, alpha)
        delta = scale * delta
    weight = base.float()
    delta = delta.to(weight.device).reshape(weight.shape)
    if "dora_scale" in parts:
        merged = weight + delta
        magnitude = parts["dora_scale"].float().to(weight.device).flatten()
        per_column = (magnitude / column_norms(merged)).reshape(1, -1, *[1] * (weight.ndim - 2))
        delta = merged * per_column - weight
    return (weight + strength * delta).to(base.dtype)


def lycoris_delta(parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int | None] | None:
    """A LoHa or LoKr module's unscaled delta, flattened to (out, in·kh·kw), and the dim the
    clients divide its alpha by. LoHa (``network_hada.py``, ``weight_adapter/loha.py``):
    (w1_a @ w1_b) ⊙ (w2_a @ w2_b), dim w1_b's rows. LoKr (``network_lokr.py``,
    ``weight_adapter/lokr.py``): kron(w1, w2), each factor whole or a product, a conv's w1
    given two unit axes; dim the last decomposed factor's rank (w2_b's over w1_b's)."""
    if set(HADA) <= set(parts):
        w1 = parts["hada_w1_a"].float() @ parts["hada_w1_b"].float()
        w2 = parts["hada_w2_a"].float() @ parts["hada_w2_b"].float()
        return w1 * w2, int(parts["hada_w1_b"].shape[0])
    w1, w2 = _lokr_factor(parts, "lokr_w1"), _lokr_factor(parts, "lokr_w2")
    if w1 is None or w2 is None:
        return None
    dim = client_dim(parts)
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2).flatten(1), dim


def _lokr_factor(parts: dict[str, torch.Tensor], name: str) -> torch.Tensor | None:
    """A LoKr factor, whole or as its product (None: the file has neither)."""
    if name in parts:
        return parts[name].float()
    if f"{name}_a" in parts and f"{name}_b" in parts:
        return parts[f"{name}_a"].float() @ parts[f"{name}_b"].float()
    return None


def comfyui_clip_keys(
    component: str, prefixes: tuple[str, ...], layers: int, target: Callable[[int, str], str]
) -> dict[str, str]:
    """ComfyUI's keys of a CLIP text encoder's LoRA-able layers (``comfy/lora.py``
    ``model_lora_keys_clip``: the first 32 layers): kohya's ``<prefix>text_model_encoder_…``
    for each of ``prefixes`` and diffusers' ``<component>.text_model.…``, each to the module
    ``target(layer, part)`` of the tool's model."""
    keys = {}
    for layer in range(min(layers, COMFYUI_CLIP_LAYERS)):
        for part in CLIP_LAYER_PARTS:
            path = f"text_model.encoder.layers.{layer}.{part}"
            keys |= {prefix + path.replace(".", "_"): target(layer, part) for prefix in prefixes}
            keys[f"{component}.{path}"] = target(layer, part)  # the diffusers-format spelling
    return keys


def named_load(
    tensors: dict[str, torch.Tensor], resolve: Callable[[str], str | None], lycoris: bool = False
) -> Load:
    """What A1111 or kohya sd-scripts applies of a file: ``resolve`` is the tool's rule from
    a kohya module name to its target (None: no module of that name); ``lycoris``: the tool
    also reads LoHa, LoKr and DoRA modules (A1111 does; kohya's networks.lora reads LoRA only)."""
    applied: Applied = {}
    unread = []
    for name, parts in sorted(kohya_groups(tensors).items()):
        target = resolve(name)
        landed = None
        if target is not None and {"lora_up.weight", "lora_down.weight"} <= set(parts):
            down, alpha = parts["lora_down.weight"], parts.get("alpha")
            scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
            landed = (parts["lora_up.weight"], down, scale)
            if lycoris and "dora_scale" in parts:  # A1111's apply_weight_decompose: per column
                magnitude = parts["dora_scale"]
                other = "" if magnitude.shape[0] == 1 else "broadcast over rows"
                applied |= dora_landed(target, magnitude, other)
            elif "dora_scale" in parts:  # kohya's networks.lora: a plain LoRA, the rest dropped
                unread.append(f"{name}.dora_scale")
        elif target is not None and lycoris:
            landed = lycoris_landed(parts, parts.get("alpha"))
        if landed is None:
            unread += [f"{name}.{part}" for part in sorted(parts)]
        else:
            applied[target] = landed
    return applied, unread


def a1111_load(
    tensors: dict[str, torch.Tensor], resolve: Callable[[str], str | None], packed: Iterable[str]
) -> Load:
    """What A1111 applies of a file: ``named_load`` with its rule ``resolve``, and a packed
    attention of ``packed`` (targets ``<attention>.in_proj_weight[q]``…, ``.out_proj``)
    changed only when all four of its projections land: otherwise none of them does."""
    targets = {name: resolve(name) for name in {key.partition(".")[0] for key in tensors}}
    landed, incomplete = set(targets.values()), set()
    for attention in packed:
        parts = {f"{attention}.in_proj_weight[{p}]" for p in "qkv"} | {f"{attention}.out_proj"}
        if not parts <= landed:
            incomplete |= parts
    return named_load(
        tensors, lambda name: None if targets[name] in incomplete else targets[name], lycoris=True
    )


def kohya_targets(models: dict[str, Any], names: KohyaNames) -> set[str]:
    """The module names kohya's network has for these models (its target blocks' classes
    are diffusers' too; on SDXL its own UNet has the same blocks in the LDM layout)."""
    found = set()
    for component, model in models.items():
        blocks = KOHYA_BLOCKS["unet" if component == "unet" else "text_encoder"]
        for path, block in model.named_modules():
            if type(block).__name__ not in blocks:
                continue
            for child_path, child in block.named_modules():
                # a layer an adapter was added to (and deleted from) keeps peft's wrapper
                child = getattr(child, "base_layer", child)
                if isinstance(child, torch.nn.Linear | torch.nn.Conv2d):
                    found.add(names.module(component, f"{path}.{child_path}"))
    return found


def trained_modules(checkpoint: Checkpoint) -> dict[tuple[str, str], Landed]:
    """(component, module) → what it trained, as peft computes it: LoRA's (lora_B, lora_A,
    alpha / rank); LoHa's and LoKr's delta (flattened, peft's own functions) and scale."""
    from peft.tuners.loha.layer import make_weight
    from peft.tuners.lokr.layer import make_kron

    modules: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in checkpoint.tensors.items():
        component, _, rest = key.partition(".")
        module, _, part = rest.rpartition(".lora_" if ".lora_" in rest else ".")
        modules.setdefault((component, module), {})[part] = tensor
    trained: dict[tuple[str, str], Landed] = {}
    for (component, module), parts in modules.items():
        config = checkpoint.adapter_configs[component]
        scale = module_alpha(config, module) / module_rank(config, module)
        if "A.weight" in parts:
            trained[(component, module)] = (parts["B.weight"], parts["A.weight"], scale)
            if "dora_scale" in parts:  # the magnitude, per input column (models.dora)
                column = parts["dora_scale"].float().reshape(-1, 1)
                trained[(component, module + DORA)] = (column, torch.ones(1, 1), 1.0)
        elif "hada_w1_a" in parts:
            hada = [parts[name].float() for name in HADA]
            trained[(component, module)] = (make_weight(*hada, 1.0).flatten(1), None, scale)
        else:
            w1, w2 = (_lokr_factor(parts, name) for name in ("lokr_w1", "lokr_w2"))
            trained[(component, module)] = (make_kron(w1, w2).flatten(1), None, scale)
    return trained


def _delta_probe(up: torch.Tensor, down: torch.Tensor | None, scale: float) -> torch.Tensor:
    """``scale · up @ down`` (``down`` None: ``up`` is the whole delta) applied to fixed
    random vectors: the delta, without forming a LoRA's."""
    up2 = up.flatten(1).float()
    width = up2.shape[1] if down is None else down.flatten(1).shape[1]
    vectors = torch.randn(width, 2, generator=torch.Generator().manual_seed(0))
    if down is None:
        return scale * (up2 @ vectors)
    return scale * (up2 @ (down.flatten(1).float() @ vectors))


def tolerance(tensors: dict[str, torch.Tensor]) -> float:
    """The relative error a file's weights allow: 16-bit weights round each factor, while a
    wrong scale is off by far more."""
    half = any(t.dtype in (torch.float16, torch.bfloat16) for t in tensors.values())
    return 2e-2 if half else 1e-4


def check_lands(path: Path, client: str, load: Load, expected: Applied, tol: float) -> None:
    """Every key read, every trained module (``expected``, by the client's target names)
    applied to its own target with the trained delta (to ``tol``); raise otherwise."""
    applied, unread = load
    if unread:
        raise LoramillError(
            f"{path}: {client} would not load {len(unread)} keys (first: {unread[0]})"
        )
    missing, extra = sorted(set(expected) - set(applied)), sorted(set(applied) - set(expected))
    if missing or extra:
        raise LoramillError(
            f"{path}: {client} lands {len(set(applied) & set(expected))} of the "
            f"{len(expected)} trained modules (first {'missing' if missing else 'extra'}: "
            f"{(missing or extra)[0]})"
        )
    for target in sorted(expected):
        got, want = _delta_probe(*applied[target]), _delta_probe(*expected[target])
        if torch.linalg.norm(got - want) > tol * torch.linalg.norm(want):
            ratio = float((got * want).sum() / (want * want).sum().clamp_min(1e-30))
            raise LoramillError(
                f"{path}: {client} applies {target} at {ratio:.3g}× the trained delta"
            )
