"""Incremental training: start a LoRA from an existing adapter file (``train.init_from``).

Accepts what loramill exports and what other trainers share: kohya-named files
(``lora_unet_…`` / ``lora_te_…``, SDXL's ``lora_te1_…`` / ``lora_te2_…``, with per-module
``.alpha``), checkpoints
(``unet.…lora_A.weight``) and the diffusers-format export (whose alpha is the rank: the trained
scale is in its weights). The rank is read from the file; a rank or alpha that differs from
the configured one is refused, because the adapter would then load at another strength.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.models.adapter_parts import (
    KOHYA_SUFFIXES,
    PEFT_SUFFIXES,
    carrier,
    client_dim,
    fold,
    network_type_of,
)
from loramill.models.checkpoint import (
    Checkpoint,
    adapter_state,
    config_alpha,
    has_alpha,
    read_checkpoint,
)
from loramill.models.diffusers_names import checkpoint_key
from loramill.models.families import DENOISERS, family_code
from loramill.models.flux.layout import KOHYA_PREFIX, bfl_modules, is_chroma, kohya_name
from loramill.models.flux.unfused import split_fused
from loramill.models.kohya_names import KOHYA_KEY_PREFIXES, TE_ROOT, KohyaNames, model_names
from loramill.models.network import NetworkSpec


def peft_module(key: str) -> str:
    """The module path of a checkpoint (peft) key, whatever the network type's part."""
    for suffix in PEFT_SUFFIXES:
        if key.endswith(suffix):
            return key.removesuffix(suffix)
    return key


def _kohya_names(models: dict[str, Any], kohya: KohyaNames) -> dict[str, tuple[str, str]]:
    """kohya module name → (component, peft module path), for the layers being trained."""
    names = {}
    for component, model in models.items():
        for key in adapter_state(model)[0]:
            module = peft_module(key)
            names[kohya.module(component, module)] = (component, module)
    return names


def _from_kohya(
    tensors: dict[str, Any], models: dict[str, Any], path: str, kohya: KohyaNames | None = None
) -> dict[str, Any]:
    kohya = kohya or model_names(models)
    names = _kohya_names(models, kohya)
    modules: dict[str, dict[str, Any]] = {}
    for key, tensor in sorted(tensors.items()):
        module, _, suffix = key.partition(".")
        component = kohya.component_of(module)
        if component not in (None, *DENOISERS) and component not in models:
            raise LoramillError(
                f"train.init_from {path}: the file has {component} layers; set "
                "train.train_text_encoder: true to train them"
            )
        if module not in names:
            raise LoramillError(
                f"train.init_from {path}: '{module}' is not a layer of the configured network"
            )
        if suffix not in (*KOHYA_SUFFIXES, "alpha"):
            raise LoramillError(f"train.init_from {path}: key '{key}' is not a LoRA weight")
        modules.setdefault(module, {})[suffix] = tensor
    converted = {}
    for module, parts in modules.items():
        component, peft_path = names[module]
        layer = models[component].get_submodule(peft_path)
        parts = _unfolded(parts, layer)
        for suffix, tensor in parts.items():
            if suffix == "dora_scale":  # LyCORIS's (1, in, …) as the layer's (in,)
                tensor = tensor.reshape(-1)
            converted[f"{component}.{peft_path}{KOHYA_SUFFIXES[suffix]}"] = tensor
    return converted


def _unfolded(parts: dict[str, Any], layer: Any) -> dict[str, Any]:
    """A kohya file's module (its tensors by suffix, ``alpha`` popped) at the scale of the
    layer being trained: an export holds the trained scale in one factor where the clients'
    scale differs from it (loramill.models.adapter_parts), which is divided out here."""
    parts = dict(parts)
    alpha = parts.pop("alpha", None)
    configured = float(layer.scaling["default"])
    dim = client_dim(parts)
    written = float(dim or 1) if alpha is None else float(alpha)  # no alpha: scale 1, as kohya's
    factor = fold(parts, configured, written)
    if factor != 1.0:
        parts[carrier(parts)] = parts[carrier(parts)] / factor
    return parts


def _rank_and_alphas(checkpoint: Any) -> tuple[list[int], list[float]]:
    """Ranks of the down (A) matrices (LoHa's and LoKr's decomposed factors) and the alphas
    the file stores, in either format."""
    tensors = checkpoint.tensors
    down = (".lora_down.weight", ".lora_A.weight", ".hada_w1_b", ".lokr_w1_b", ".lokr_w2_b")
    ranks = sorted({int(t.shape[0]) for k, t in tensors.items() if k.endswith(down)})
    alphas = [float(t) for k, t in tensors.items() if k.endswith(".alpha")]
    configs = checkpoint.adapter_configs
    config = configs.get("unet") or configs.get("transformer") or {}
    if not alphas and has_alpha(config):
        patterns = config.get("alpha_pattern") or {}
        alphas = [config_alpha(config), *map(float, patterns.values())]
    # Neither format must store alpha; both then mean alpha = rank (scale 1).
    return ranks, sorted(set(alphas)) or [float(r) for r in ranks]


def _configured_scales(models: dict[str, Any]) -> tuple[set[int], set[float]]:
    """The ranks and alphas of the LoRA layers being trained (the network's, kohya_conv's
    convs', each block's with kohya's block-wise options)."""
    ranks, alphas = set(), set()
    for model in models.values():
        config = model.peft_config["default"]
        ranks |= {int(config.r), *map(int, config.rank_pattern.values())}
        alphas |= {config_alpha(vars(config)), *map(float, config.alpha_pattern.values())}
    return ranks, alphas


def _check_scale(checkpoint: Any, models: dict[str, Any], path: str) -> None:
    """The file's ranks and alphas are the configured network's: else it loads at another
    strength than it was trained at."""
    ranks, alphas = _rank_and_alphas(checkpoint)
    if not any(not key.endswith(".alpha") for key in checkpoint.tensors):
        raise LoramillError(f"train.init_from {path}: no LoRA tensors")
    want_ranks, want_alphas = _configured_scales(models)
    # no rank to compare in a LoKr file whose factors are all whole (their shapes are checked
    # against the layers' later, _check_ranks)
    if not (set(ranks) <= want_ranks and set(alphas) <= want_alphas):
        shown_rank, shown_alpha = "/".join(map(str, ranks)), "/".join(f"{a:g}" for a in alphas)
        rank, alpha = (
            "/".join(map(str, sorted(want_ranks))),
            "/".join(f"{a:g}" for a in sorted(want_alphas)),
        )
        raise LoramillError(
            f"train.init_from {path}: the file has rank {shown_rank}, alpha {shown_alpha}; "
            f"the config has rank {rank}, alpha {alpha} (set train.rank and train.alpha)"
        )


def _from_kohya_flux(
    tensors: dict[str, Any], models: dict[str, Any], network: NetworkSpec, path: str
) -> dict[str, Any]:
    """A kohya-format Flux file: its fused transformer modules split into the diffusers
    modules they stack (loramill.models.flux.unfused), CLIP-L's keys as for SD."""
    transformer = models["transformer"]
    blocks = bfl_modules(transformer.config, network.train_blocks)
    fused = {kohya_name(bfl): parts for bfl, parts in blocks.items()}
    scale = (network.rank, float(network.alpha))
    family = family_code("chroma" if is_chroma(transformer.config) else "flux")
    t5 = family.kohya_prefixes[family.text_encoders[-1]]  # T5 is the last encoder of both
    converted, text = {}, {}
    for stem in sorted({key.split(".", 1)[0] for key in tensors}):
        if stem.startswith(f"{t5}_"):
            raise LoramillError(
                f"train.init_from {path}: the file has T5 layers ('{stem}'); loramill does not "
                "train T5 (kohya's default), so it cannot start from them"
            )
        if not stem.startswith(KOHYA_PREFIX):
            text |= {k: v for k, v in tensors.items() if k.split(".", 1)[0] == stem}
            continue
        if stem not in fused:
            raise LoramillError(
                f"train.init_from {path}: '{stem}' is not a layer of the configured network "
                f"(train_blocks: {network.train_blocks})"
            )
        parts = fused[stem]
        sizes = [_out_features(transformer, part) for part in parts]
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        alpha = float(tensors.get(f"{stem}.alpha", down.shape[0]))
        try:
            pairs = split_fused(stem, down, up, alpha, sizes, scale)
        except LoramillError as error:
            raise LoramillError(f"train.init_from {path}: {error}") from None
        for part, (a, b) in zip(parts, pairs, strict=True):
            converted[f"transformer.{part}.lora_A.weight"] = a.contiguous()
            converted[f"transformer.{part}.lora_B.weight"] = b.contiguous()
    if text:
        _check_scale(Checkpoint(text, {}), models, path)
        encoders = {c: m for c, m in models.items() if c != "transformer"}
        converted |= _from_kohya(text, encoders, path, KohyaNames(family.name))
    return converted


def _out_features(model: Any, module: str) -> int:
    layer = model.get_submodule(module)
    return getattr(layer, "base_layer", layer).out_features


def read_init_weights(
    path: str | os.PathLike, models: dict[str, Any], network: NetworkSpec
) -> dict[str, Any]:
    """The file's LoRA tensors under checkpoint keys (``unet.<module>.lora_A.weight`` …),
    checked against the configured ranks and alphas and the layers being trained."""
    if not Path(path).is_file():
        raise LoramillError(f"train.init_from {path}: no such file")
    try:
        checkpoint = read_checkpoint(path)
    except Exception as error:  # safetensors reports a bad file in several exception types
        raise LoramillError(f"train.init_from {path}: not a safetensors file ({error})") from None
    tensors = checkpoint.tensors
    kohya = any(key.startswith(KOHYA_KEY_PREFIXES) for key in tensors)
    if kohya and "transformer" in models:
        tensors = _from_kohya_flux(tensors, models, network, str(path))
    else:
        _check_type(tensors, network, str(path))
        _check_scale(checkpoint, models, str(path))
        if kohya:
            tensors = _from_kohya(tensors, models, str(path))
        else:  # the diffusers export spells UNet keys as diffusers and ComfyUI both read them
            tensors = {checkpoint_key(key): tensor for key, tensor in tensors.items()}
    if not hasattr(models.get("text_encoder"), "text_model"):
        # diffusers-format files name the text encoder by transformers 4's path (kohya
        # files' keys, converted above, have none)
        te_root = "text_encoder." + TE_ROOT
        tensors = {"text_encoder." + k.removeprefix(te_root) if k.startswith(te_root) else k: v
                   for k, v in tensors.items()}  # fmt: skip
    for component in sorted({key.partition(".")[0] for key in tensors} - set(models)):
        raise LoramillError(
            f"train.init_from {path}: the file has {component} layers; set "
            "train.train_text_encoder: true to train them"
        )
    layers = {
        f"{c}.{k}": t.shape for c, m in models.items() for k, t in adapter_state(m)[0].items()
    }
    _check_covers(tensors, layers, network, str(path))
    _check_ranks(tensors, layers, str(path))
    return tensors


def _check_ranks(tensors: dict[str, Any], layers: dict[str, Any], path: str) -> None:
    """Each module's tensors have the shapes configured for it (``layers``: the shape of each
    tensor being trained; block-wise ranks differ by module, LoKr's factors by the factor)."""
    for key, shape in layers.items():
        found = tensors.get(key)
        if found is None:
            continue
        if tuple(found.shape) != tuple(shape):
            component, _, module = peft_module(key).partition(".")
            part = key.removeprefix(f"{component}.{module}.")
            rank = part == "lora_A.weight"  # a LoRA's rank is its down matrix's rows
            found_as, shape_as = (found.shape[0], shape[0]) if rank else (found.shape, shape)
            raise LoramillError(
                f"train.init_from {path}: {component} module '{module}' has "
                f"{'rank' if rank else part} {_shown(found_as)} in the file, "
                f"{_shown(shape_as)} in the config (set train.rank, or block_dims / "
                "conv_block_dims; for LoKr, factor)"
            )


def _parts(keys: Any, module: str) -> str:
    """A module's parts among checkpoint ``keys``: ``lokr_w1+lokr_w2``."""
    return "+".join(sorted(k.removeprefix(module + ".") for k in keys if peft_module(k) == module))


def _shown(size: Any) -> str:
    return str(size) if isinstance(size, int) else str(tuple(size))


def _check_covers(
    tensors: dict[str, Any], layers: dict[str, Any], network: NetworkSpec, path: str
) -> None:
    """A file with fewer layers than the configured network would leave some layers fresh
    and train another network than the one it claims to continue."""
    expected = set(layers)
    if not expected <= set(tensors):
        have = {peft_module(key) for key in set(tensors) & expected}
        want = {peft_module(key) for key in expected}
        if have == want:  # every module, split into other parts (a LoKr's factors)
            module = peft_module(min(expected - set(tensors)))
            raise LoramillError(
                f"train.init_from {path}: '{module}' has {_parts(tensors, module)} in the file, "
                f"{_parts(expected, module)} in the config (set train.rank, and LoKr's factor "
                "and decompose_both, as the file was trained)"
            )
        raise LoramillError(
            f"train.init_from {path}: the file has LoRA layers for {len(have)} of the "
            f"{len(want)} modules train.network_target: {network.target} trains; set "
            "network_target to the file's (attention, kohya or kohya_conv)"
        )


def _check_type(tensors: dict[str, Any], network: NetworkSpec, path: str) -> None:
    """A file of another network type (LoHa's tensors for a LoRA) holds none of the layers'
    tensors, and scales otherwise: named first."""
    file_type = network_type_of(tensors)
    if file_type != network.network_type:
        raise LoramillError(
            f"train.init_from {path}: the file holds a {file_type} network; set "
            f"train.network_type: {file_type}"
        )
