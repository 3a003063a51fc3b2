"""One trained module's tensors in both spellings, for every network type: peft's (a
checkpoint: ``<module>.lora_A.weight``, ``.hada_w1_a`` …) and kohya's / LyCORIS's (the
kohya file: ``<name>.lora_down.weight``, ``.hada_w1_a``, ``.lokr_w1``, ``.dora_scale``,
``.alpha``).

Both name the factors alike but may scale them differently. peft scales every module by its
trained alpha / rank. The clients (AUTOMATIC1111, ComfyUI, LyCORIS) scale by the file's
``.alpha`` over the module's *dim* — LoRA's and DoRA's down rows, LoHa's ``hada_w1_b`` rows,
LoKr's decomposed factor's rank — and a LoKr module with both factors whole by 1, whatever its
alpha. Where the two differ, the trained scale over the client's is folded into one factor
(the *carrier*: every type's delta is linear in it), so each client applies the trained
delta; ``fold`` gives that factor and reading a file back divides it out.

DoRA's magnitude (loramill.models.dora) is one norm per input column, (in,); LyCORIS stores
it as ``dora_scale`` shaped (1, in) for a Linear and (1, in, 1, 1) for a conv, which is how
ComfyUI tells it is per input column.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from loramill import LoramillError

HADA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")
# peft suffix → kohya / LyCORIS suffix
PEFT_SUFFIXES = {
    ".lora_A.weight": "lora_down.weight",
    ".lora_B.weight": "lora_up.weight",
    ".lora_dora_scale": "dora_scale",  # DoRA's magnitude (loramill.models.dora)
    **{f".{part}": part for part in (*HADA, *LOKR)},
}
# the parts that tell a network type from LoRA's, in a checkpoint's keys and a kohya file's
TYPE_MARKERS = {".hada_": "loha", ".lokr_": "lokr", "dora_scale": "dora"}
KOHYA_SUFFIXES = {kohya: peft for peft, kohya in PEFT_SUFFIXES.items()}
# Each type's parts of a module (kohya spelling): LoKr's factors each whole or a product.
LORA_PARTS = ("lora_down.weight", "lora_up.weight")
TYPE_PARTS: dict[str, tuple[tuple[str, ...], ...]] = {
    "lora": (LORA_PARTS,),
    "dora": ((*LORA_PARTS, "dora_scale"),),
    "loha": (HADA,),
    "lokr": tuple(
        (*first, *second)
        for first in (("lokr_w1",), ("lokr_w1_a", "lokr_w1_b"))
        for second in (("lokr_w2",), ("lokr_w2_a", "lokr_w2_b"))
    ),
}
# the factor that carries a folded scale
CARRIERS = ("lora_up.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a")


def network_type_of(keys: Iterable[str]) -> str:
    """The network type (train.network_type) whose tensors ``keys`` name, in either format."""
    keys = list(keys)
    for marker, kind in TYPE_MARKERS.items():
        if any(marker in key for key in keys):
            return kind
    return "lora"


def kohya_groups(tensors: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """A kohya file's tensors by module: name → {part (``lora_up.weight``, ``alpha`` …):
    tensor}."""
    groups: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = tensor
    return groups


def parts_problem(kind: str, parts: set[str]) -> str | None:
    """What is wrong with a module's parts (kohya spelling) for network type ``kind``; None
    when they are one of the type's sets."""
    shapes = TYPE_PARTS[kind]
    if any(parts == set(shape) for shape in shapes):
        return None
    wanted = " or ".join("+".join(shape) for shape in shapes)
    return f"has {'+'.join(sorted(parts))}, a {kind} module has {wanted}"


def client_dim(parts: dict[str, Any]) -> int | None:
    """The dim the clients divide a module's alpha by (None: they scale it by 1): LoRA's down
    rows, LoHa's w1_b rows, LoKr's decomposed factor's rank (w2_b's over w1_b's, as A1111's
    network_lokr.py and ComfyUI's lokr.py read it)."""
    for part in ("lora_down.weight", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if part in parts:
            return int(parts[part].shape[0])
    return None


def fold(parts: dict[str, Any], trained_scale: float, alpha: float) -> float:
    """The factor on the carrier that makes a client reading ``alpha`` apply the trained
    delta (``trained_scale``: peft's alpha / rank of the module)."""
    dim = client_dim(parts)
    return trained_scale / (1.0 if dim is None else alpha / dim)


def carrier(parts: dict[str, Any]) -> str:
    """The part a module's folded scale is carried by (LoramillError: it has none)."""
    found = [part for part in CARRIERS if part in parts]
    if not found:
        raise LoramillError(f"a module of {'+'.join(sorted(parts))} has no factor to scale")
    return found[0]


def dora_scale(magnitude: Any, down: Any) -> Any:
    """LyCORIS's ``dora_scale`` of a module's magnitude (``down``: its lora_down, 2-D for a
    Linear, 4-D for a conv): (1, in) or (1, in, 1, 1)."""
    return magnitude.reshape(1, -1, *[1] * (down.ndim - 2))
