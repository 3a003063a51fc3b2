"""Which cells an X/Y/Z grid has: axes from the config, one Cell per combination.

Pure: no model, no files. Every setting of the grid (``prompts``, ``strengths``, ``seed``, …)
is a value or a list of values; an axis (``x``, ``y``, ``z``) names the setting whose values
it spreads, and a setting on no axis must have exactly one value. The checkpoint axis is
resolved against the steps a run saved.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from loramill import LoramillError
from loramill.models.samplers import SAMPLERS
from loramill.train.family_options import FLUX_FAMILIES

# axis name -> (config key, label). Labels are AUTOMATIC1111's "Axis: value" captions.
AXES: dict[str, tuple[str, str]] = {
    "checkpoint": ("checkpoints", "Step"),
    "strength": ("strengths", "Strength"),
    "prompt": ("prompts", "Prompt"),
    "prompt_sr": ("prompt_sr", "Prompt S/R"),
    "negative_prompt": ("negative_prompt", "Negative prompt"),
    "seed": ("seed", "Seed"),
    "guidance_scale": ("guidance_scale", "CFG scale"),
    "num_inference_steps": ("num_inference_steps", "Sampling steps"),
    "sampler": ("sampler", "Sampler"),
    "resolution": ("resolution", "Resolution"),
}
POSITIONS = ("x", "y", "z")
LAST_N = re.compile(r"^last:([1-9][0-9]*)$")
# A grid that sets no prompts shows the dataset's first training captions: this many when
# prompt is an axis, else the first one.
CAPTION_PROMPTS = 2
# FLUX.1's and Chroma's pixels per latent token: 8× latents packed 2 × 2 (their pipelines
# silently draw another size than a resolution not divisible by it)
FLUX_PIXELS = 16


@dataclass(frozen=True)
class Cell:
    """Everything one image depends on, besides the base model and the adapter's tensors."""

    step: int
    unet_strength: float
    te_strength: float
    prompt: str
    negative_prompt: str
    seed: int
    guidance_scale: float
    num_inference_steps: int
    sampler: str
    resolution: int

    @property
    def uses_adapter(self) -> bool:
        return bool(self.unet_strength or self.te_strength)

    @property
    def adapter_step(self) -> int | None:
        """The checkpoint the cell shows, None for the base model (strength 0)."""
        return self.step if self.uses_adapter else None

    def settings(self) -> dict[str, Any]:
        """The inference settings, without the checkpoint: what a cache key needs beside the
        adapter's content (a strength-0 cell is the base model, whatever the checkpoint)."""
        settings = asdict(self)
        del settings["step"]
        return settings

    def batch_group(self) -> tuple[Any, ...]:
        """Cells equal here can share one pipeline call: they differ only in prompt and seed."""
        return (self.adapter_step, self.unet_strength, self.te_strength, self.sampler,
                self.num_inference_steps, self.guidance_scale, self.resolution)  # fmt: skip


@dataclass(frozen=True)
class Axis:
    name: str  # a key of AXES, or "" for the one-value placeholder of an unused position
    values: tuple[Any, ...]
    labels: tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    x: Axis
    y: Axis
    z: Axis
    cells: tuple[tuple[tuple[Cell, ...], ...], ...]  # cells[z][y][x]

    def all_cells(self) -> list[Cell]:
        return [cell for plane in self.cells for row in plane for cell in row]


def _values(settings: dict[str, Any], key: str) -> list[Any]:
    value = settings.get(key)
    return list(value) if isinstance(value, list | tuple) else [value]


def select_checkpoints(selection: Any, steps: Sequence[int]) -> list[int]:
    """``all``, ``last`` (the final step), ``last:N`` (the N latest) or a list of steps."""
    available = sorted(set(steps))
    if not available:
        raise LoramillError("grid: no checkpoints to compare")
    if selection in ("all", None):
        return available
    if selection == "last":
        return available[-1:]
    if isinstance(selection, str):
        match = LAST_N.match(selection)
        if not match:
            raise LoramillError(
                f"grid.checkpoints: '{selection}' is not all, last, last:N, best:N or a list "
                "of steps"
            )
        return available[-int(match.group(1)) :]
    wanted = [selection] if isinstance(selection, int) else list(selection)
    missing = [step for step in wanted if step not in available]
    if missing:
        raise LoramillError(
            f"grid.checkpoints: no checkpoint at step {', '.join(map(str, missing))} "
            f"(saved: {', '.join(map(str, available))})"
        )
    return sorted(set(wanted))


def _strength(value: Any) -> tuple[float, float]:
    """A number (UNet and text encoder alike) or [unet, text_encoder]."""
    pair = value if isinstance(value, list | tuple) else (value, value)
    if len(pair) != 2 or not all(isinstance(v, int | float) and v == v for v in pair):
        raise LoramillError(f"grid.strengths: {value!r} is not a number or [unet, text_encoder]")
    if any(abs(v) == float("inf") for v in pair):
        raise LoramillError(f"grid.strengths: {value!r} is not finite")
    return float(pair[0]), float(pair[1])


def _number(value: float) -> str:
    # 1.0 -> "1", 0.25 -> "0.25": what a user would type, unless that loses digits
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _label(axis: str, value: Any) -> str:
    if axis == "strength":
        unet, te = value
        text = _number(unet) if unet == te else f"UNet {_number(unet)}, TE {_number(te)}"
    elif isinstance(value, float):
        text = _number(value)
    else:
        text = str(value)
    return f"{AXES[axis][1]}: {text}"


def prompt_sr(text: str, search: str, replacement: str) -> str:
    """AUTOMATIC1111's Prompt S/R: every occurrence of the first value replaced."""
    return text.replace(search, replacement)


def _replace(cell: Cell, search: str, replacement: str) -> Cell:
    """A1111's Prompt S/R on one cell; like A1111, a cell whose prompt and negative prompt
    both lack the search text is refused (before any model loads)."""
    if search not in cell.prompt and search not in cell.negative_prompt:
        raise LoramillError(
            f"grid.prompt_sr: '{search}' (the search text, its first value) is not in the "
            f"prompt '{cell.prompt}' or its negative prompt '{cell.negative_prompt}'"
        )
    return replace(
        cell,
        prompt=prompt_sr(cell.prompt, search, replacement),
        negative_prompt=prompt_sr(cell.negative_prompt, search, replacement),
    )


def _axis_values(settings: dict[str, Any], name: str, steps: Sequence[int]) -> list[Any]:
    key = AXES[name][0]
    if name == "checkpoint":
        return select_checkpoints(settings.get(key, "all"), steps)
    values = _values(settings, key)
    if name == "strength":
        return [_strength(v) for v in values]
    return values


def _positions(settings: dict[str, Any]) -> dict[str, str]:
    """position -> axis name, for the positions in use; unknown or repeated axes refused."""
    used: dict[str, str] = {}
    for position in POSITIONS:
        name = settings.get(position)
        if name in (None, "", "none"):
            continue
        if name not in AXES:
            raise LoramillError(f"grid.{position}: '{name}' is not one of {', '.join(AXES)}")
        if name in used.values():
            raise LoramillError(f"grid.{position}: '{name}' is already another axis")
        used[position] = name
    return used


def _single(settings: dict[str, Any], name: str, steps: Sequence[int]) -> Any:
    """The one value of a setting on no axis; several values there are a config error."""
    if name == "prompt_sr":
        if settings.get("prompt_sr"):
            raise LoramillError("grid.prompt_sr: set x, y or z to prompt_sr to use it")
        return None
    if name == "checkpoint":  # off the axes: all, last:N and last mean the final step
        selection = settings.get("checkpoints", "last")
        values = (
            select_checkpoints(selection, steps)[-1:]
            if isinstance(selection, str)
            else (select_checkpoints(selection, steps))
        )
    else:
        values = _axis_values(settings, name, steps)
    if len(values) != 1:
        key = AXES[name][0]
        raise LoramillError(
            f"grid.{key}: {len(values)} values but no axis shows them "
            f"(set x, y or z to {name}, or give one value)"
        )
    return values[0]


def plan_grid(settings: dict[str, Any], steps: Sequence[int]) -> Plan:
    """The grid's axes and cells; ``settings`` is the grid config with prompts resolved
    (``{trigger}`` replaced) and ``resolution`` set."""
    positions = _positions(settings)
    axes: dict[str, Axis] = {}
    for position in POSITIONS:
        name = positions.get(position)
        if name is None:
            axes[position] = Axis("", (None,), ("",))
            continue
        values = _axis_values(settings, name, steps)
        if not values:
            raise LoramillError(f"grid.{AXES[name][0]}: no values for the {position} axis")
        axes[position] = Axis(name, tuple(values), tuple(_label(name, v) for v in values))
    base = {name: _single(settings, name, steps) for name in AXES if name not in positions.values()}

    def cell(z: int, y: int, x: int) -> Cell:
        chosen = dict(base)
        for position, index in zip(POSITIONS, (x, y, z), strict=True):
            axis = axes[position]
            if axis.name:
                chosen[axis.name] = axis.values[index]
        made = _make_cell(chosen)
        if "prompt_sr" in positions.values():
            made = _replace(made, settings["prompt_sr"][0], chosen["prompt_sr"])
        return made

    x, y, z = (len(axes[p].values) for p in POSITIONS)
    cells = tuple(tuple(tuple(cell(k, j, i) for i in range(x)) for j in range(y)) for k in range(z))
    return Plan(axes["x"], axes["y"], axes["z"], cells)


def caption_prompts(captions: Sequence[str], settings: dict[str, Any]) -> list[str]:
    """The prompts of a grid that sets none: the dataset's first distinct training captions,
    used as trained (the trigger words are in them already)."""
    count = CAPTION_PROMPTS if "prompt" in _positions(settings).values() else 1
    distinct = list(dict.fromkeys(text for text in captions if text))
    if not distinct:
        raise LoramillError("grid.prompts: none set and the dataset has no training captions")
    return distinct[:count]


def check_family(settings: dict[str, Any], family: str | None) -> None:
    """Grid settings that mean nothing for the base model's ``family`` (None: not known yet),
    refused naming the key: FLUX.1 and Chroma render with their base model's flow-matching
    Euler scheduler, and FLUX.1 reads no negative prompt (its guidance_scale feeds the
    guidance embedding [dev] was distilled with; Chroma's is classifier-free guidance)."""
    if family not in FLUX_FAMILIES:
        return
    if samplers := [s for s in _values(settings, "sampler") if s != "default"]:
        raise LoramillError(
            f"grid.sampler '{samplers[0]}': FLUX.1 and Chroma render with their base model's "
            "flow-matching Euler scheduler (the SD samplers do not apply); remove it"
        )
    if family == "flux" and (negatives := [n for n in _values(settings, "negative_prompt") if n]):
        raise LoramillError(
            f"grid.negative_prompt '{negatives[0]}': FLUX.1 reads no negative prompt (its "
            "guidance_scale is the distilled guidance embedding's); remove it"
        )
    if odd := [r for r in _values(settings, "resolution") if r and int(r) % FLUX_PIXELS]:
        raise LoramillError(
            f"grid.resolution {odd[0]}: FLUX.1 and Chroma draw multiples of {FLUX_PIXELS} "
            "pixels (8× latents packed 2 × 2)"
        )


def check_grid(settings: dict[str, Any], family: str | None = None) -> None:
    """Refuse a grid config that cannot be planned, before any job runs (the saved steps are
    not known yet: named steps are taken as saved; captions stand in for unset prompts).
    ``family``: the base model's (None: not known yet, a hub model not downloaded)."""
    check_family(settings, family)
    named = settings.get("checkpoints")
    if isinstance(named, str) and named.startswith("best:"):  # the validation result's steps
        settings = {**settings, "checkpoints": "last"}
    if not settings.get("prompts"):
        if settings.get("prompt_sr"):
            # its search text must be in the prompts, which the captions cannot promise
            raise LoramillError("grid.prompt_sr: set grid.prompts too (the text it replaces)")
        stand_ins = [f"caption {n}" for n in range(CAPTION_PROMPTS)]
        settings = {**settings, "prompts": caption_prompts(stand_ins, settings)}
    plan_grid(settings, named if isinstance(named, list) else [1])


def _make_cell(chosen: dict[str, Any]) -> Cell:
    unet, te = chosen["strength"]
    sampler = str(chosen["sampler"])
    if sampler != "default" and sampler not in SAMPLERS and not sampler.endswith("Scheduler"):
        raise LoramillError(
            f"grid.sampler: '{sampler}' is not default, a diffusers scheduler class or one of "
            f"{', '.join(SAMPLERS)}"
        )
    resolution = int(chosen["resolution"])
    if resolution <= 0 or resolution % 8:
        raise LoramillError(f"grid.resolution: {resolution} is not a positive multiple of 8")
    return Cell(
        step=int(chosen["checkpoint"]),
        unet_strength=unet,
        te_strength=te,
        prompt=str(chosen["prompt"]),
        negative_prompt=str(chosen["negative_prompt"] or ""),
        seed=int(chosen["seed"]),
        guidance_scale=float(chosen["guidance_scale"]),
        num_inference_steps=int(chosen["num_inference_steps"]),
        sampler=sampler,
        resolution=resolution,
    )


def batches(cells: Sequence[Cell], size: int) -> list[list[Cell]]:
    """Cells in rendering order, grouped into pipeline calls of at most ``size``: one adapter
    state at a time (checkpoints in step order, base-model cells first)."""

    def order(cell: Cell) -> tuple[Any, ...]:
        group = cell.batch_group()
        return (group[0] is not None, group[0] or 0, *group[1:])

    # A base-model cell (strength 0) is the same image under every checkpoint: drawn once.
    unique = {(*c.settings().values(), c.adapter_step): c for c in cells}
    ordered = sorted(unique.values(), key=order)
    out: list[list[Cell]] = []
    for _, group in itertools.groupby(ordered, key=Cell.batch_group):
        members = list(group)
        out += [members[i : i + size] for i in range(0, len(members), size)]
    return out
