"""Comparison grids of LoRA checkpoints, laid out like AUTOMATIC1111's X/Y/Z plot.

X (columns) = checkpoint step, Y (rows) = LoRA strength, Z = prompt: one labelled sub-grid per
prompt, stacked vertically. Every cell uses the same seed, so only the axis values differ
between cells. A JSON file beside the PNG gives every cell's box for machines.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.export import to_kohya
from loramill.files import atomic_path, write_json
from loramill.lora import COMPONENTS, Checkpoint, read_checkpoint

# Tiny test models render 64 px cells, unreadable next to their labels and in any image viewer.
# Such cells are enlarged by an integer factor with NEAREST: every generated pixel becomes an
# exact block, so nothing is invented and a cell still maps bit-for-bit to the pipeline output.
MIN_CELL = 256
STEP_KEY = "loramill.step"
BACKGROUND = (255, 255, 255)
INK = (0, 0, 0)


@dataclass(frozen=True)
class _Checkpoint:
    path: Path
    step: int


def _read_step(path: Path) -> _Checkpoint:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except (OSError, SafetensorError) as error:
        raise LoramillError(f"{path}: cannot read checkpoint ({error})") from None
    try:
        return _Checkpoint(path, int(metadata[STEP_KEY]))
    except (KeyError, ValueError):
        raise LoramillError(f"{path}: no integer '{STEP_KEY}' in its metadata") from None


def _format_strength(value: float) -> str:
    return f"{value:g}"  # 1.0 -> "1", 0.25 -> "0.25": what a user would type


def _wrap(text: str, font: Any, width: float) -> list[str]:
    """Greedy word wrap; a word wider than the line is split by characters."""
    lines: list[str] = []
    line = ""
    for word in text.split():
        candidate = f"{line} {word}" if line else word
        if font.getlength(candidate) <= width:
            line = candidate
            continue
        if line:
            lines.append(line)
        line = ""
        for char in word:
            if line and font.getlength(line + char) > width:
                lines.append(line)
                line = ""
            line += char
    lines.append(line)
    return lines


@dataclass
class _Layout:
    cell: int
    scale: int
    width: int
    height: int
    # (text, x, y, anchor) for ImageDraw.text; cells[z][y][x] = (x0, y0, x1, y1)
    texts: list[tuple[str, float, float, str]]
    cells: list[list[list[tuple[int, int, int, int]]]]


def _layout(
    cell: int, scale: int, columns: list[str], rows: list[str], titles: list[str], font: Any
) -> _Layout:
    pad = font.size // 2
    ascent, descent = font.getmetrics()
    line = ascent + descent + font.size // 4
    left = math.ceil(max(font.getlength(text) for text in rows)) + 2 * pad
    width = left + cell * len(columns)
    column_lines = [_wrap(text, font, cell - 2 * pad) for text in columns]
    header = max(len(lines) for lines in column_lines) * line + 2 * pad

    texts: list[tuple[str, float, float, str]] = []
    cells: list[list[list[tuple[int, int, int, int]]]] = []
    y = 0
    for z, title in enumerate(titles):
        if z:
            y += 2 * pad  # white gap so sub-grids read as separate plots
        title_lines = _wrap(title, font, width - 2 * pad)
        for i, text in enumerate(title_lines):
            texts.append((text, pad, y + pad + i * line, "la"))
        y += len(title_lines) * line + 2 * pad
        for c, lines in enumerate(column_lines):
            # Bottom-align the label block so one-line labels sit just above their cells.
            top = y + header - pad - len(lines) * line
            for i, text in enumerate(lines):
                texts.append((text, left + c * cell + cell / 2, top + i * line, "ma"))
        y += header
        grid = []
        for r, text in enumerate(rows):
            texts.append((text, left / 2, y + r * cell + cell / 2, "mm"))
            x0s = [left + c * cell for c in range(len(columns))]
            grid.append([(x0, y + r * cell, x0 + cell, y + (r + 1) * cell) for x0 in x0s])
        cells.append(grid)
        y += cell * len(rows)
    return _Layout(cell, scale, width, y, texts, cells)


@contextlib.contextmanager
def _quiet_adapter_loading() -> Iterator[None]:
    """Hide transformers' per-adapter "LOAD REPORT" and its progress bar.

    transformers 5 reports every frozen text-encoder weight as MISSING ("newly initialized")
    when diffusers loads a LoRA into it; that is false and alarming. Nothing is lost by hiding
    it: _check_loaded verifies that every tensor of the checkpoint landed. Only this one logger
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


def _check_loaded(pipe: Any, adapter: str, checkpoint: Checkpoint, path: Path) -> None:
    """Refuse a silent partial load (DESIGN §5): every LoRA tensor in the file must be in use."""
    from peft.utils import get_peft_model_state_dict

    found = 0
    for component in COMPONENTS:
        wanted = set(checkpoint.component(component))
        if not wanted:
            continue
        found += len(wanted)
        loaded = set(get_peft_model_state_dict(getattr(pipe, component), adapter_name=adapter))
        missing = sorted(wanted - loaded)
        if missing:
            raise LoramillError(
                f"{path}: {len(missing)} of {len(wanted)} {component} LoRA tensors do not fit "
                f"the base model (first: {missing[0]})"
            )
    if not found:
        raise LoramillError(
            f"{path}: no unet./text_encoder. LoRA tensors (not a loramill checkpoint)"
        )


def render_grid(
    base_model: str,
    checkpoints: list[str | os.PathLike],
    strengths: list[float],
    prompts: list[str],
    out_png: str | os.PathLike,
    out_json: str | os.PathLike,
    *,
    seed: int,
    num_inference_steps: int,
    guidance_scale: float,
    resolution: int,
    negative_prompt: str = "",
    dtype: str = "float32",
    allow_unsafe_weights: bool = False,
    device: str = "auto",
    clip_skip: int = 1,
    max_token_length: int = 75,
) -> None:
    """Render the step × strength × prompt grid to ``out_png`` and describe it in ``out_json``."""
    if not checkpoints:
        raise LoramillError("grid: no checkpoints to compare")
    if not strengths:
        raise LoramillError("grid: no LoRA strengths given")
    if not prompts:
        raise LoramillError("grid: no prompts given")
    if resolution <= 0 or resolution % 8:
        raise LoramillError(f"grid: resolution {resolution} is not a positive multiple of 8")
    strengths = [float(s) for s in strengths]
    if not all(math.isfinite(s) for s in strengths):
        raise LoramillError(f"grid: LoRA strengths must be finite numbers, got {strengths}")
    # Read every step before loading the model, so a bad file fails in a second, not minutes.
    ckpts = sorted((_read_step(Path(p)) for p in checkpoints), key=lambda c: (c.step, c.path.name))

    import torch
    from PIL import Image, ImageDraw, ImageFont

    from loramill.devices import resolve_device
    from loramill.latents import Conditioning, prompt_arguments
    from loramill.model import load_pipeline

    columns = [f"Step: {c.step}" for c in ckpts]
    rows = [f"Strength: {_format_strength(s)}" for s in strengths]
    titles = [f"Prompt: {p}" for p in prompts]
    # Font scales with the displayed cell (A1111 uses ~1/25 of the cell; a little larger here
    # because the default font is narrow). FreeType rendering is deterministic, so equal inputs
    # give equal PNG bytes on one installation.
    scale = math.ceil(MIN_CELL / resolution)
    font = ImageFont.load_default(size=max(12, resolution * scale // 16))
    layout = _layout(resolution * scale, scale, columns, rows, titles, font)
    canvas = Image.new("RGB", (layout.width, layout.height), BACKGROUND)

    pipe = load_pipeline(base_model, dtype=dtype, allow_unsafe_weights=allow_unsafe_weights)
    how = Conditioning(clip_skip, max_token_length)
    pipe.to(resolve_device(device))

    def render(prompt: str) -> Any:
        # A fresh CPU generator per cell: every cell starts from the same latent noise whatever
        # the render order, and a CPU generator gives the same noise on any device.
        generator = torch.Generator(device="cpu").manual_seed(seed)
        image = pipe(
            **prompt_arguments(pipe, prompt, negative_prompt, how),
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            height=resolution,
            width=resolution,
            generator=generator,
        ).images[0]
        return image.resize((layout.cell, layout.cell), Image.Resampling.NEAREST)

    def paste(image: Any, z: int, y: int, x: int) -> None:
        canvas.paste(image, layout.cells[z][y][x][:2])

    # Strength 0 is the base model: render it before any adapter is loaded (bit-exact, and
    # immune to a LoRA with inf weights turning 0 * inf into NaN), once per prompt.
    zero_rows = [y for y, s in enumerate(strengths) if s == 0]
    if zero_rows:
        for z, prompt in enumerate(prompts):
            image = render(prompt)
            for y in zero_rows:
                for x in range(len(ckpts)):
                    paste(image, z, y, x)

    # One adapter in memory at a time: a run may have dozens of checkpoints. Each goes through
    # the kohya export, the format AUTOMATIC1111 and ComfyUI users load, so the grid shows what
    # they will get (and an export change re-renders the grid).
    for x, ckpt in enumerate(ckpts):
        adapter = f"ckpt{x}"
        try:
            checkpoint = read_checkpoint(ckpt.path)
            kohya = to_kohya(checkpoint)
            with _quiet_adapter_loading():
                pipe.load_lora_weights(kohya, adapter_name=adapter)
        except (OSError, ValueError, RuntimeError, KeyError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise LoramillError(f"{ckpt.path}: cannot load as a LoRA ({reason})") from None
        _check_loaded(pipe, adapter, checkpoint, ckpt.path)
        for y, strength in enumerate(strengths):
            if strength == 0:
                continue
            pipe.set_adapters([adapter], [strength])
            for z, prompt in enumerate(prompts):
                paste(render(prompt), z, y, x)
        pipe.delete_adapters(adapter)

    draw = ImageDraw.Draw(canvas)
    labels = []
    for text, tx, ty, anchor in layout.texts:
        draw.text((tx, ty), text, fill=INK, font=font, anchor=anchor)
        box = draw.textbbox((tx, ty), text, font=font, anchor=anchor)
        labels.append(
            {
                "text": text,
                "box": [
                    math.floor(box[0]),
                    math.floor(box[1]),
                    math.ceil(box[2]),
                    math.ceil(box[3]),
                ],
            }
        )

    cells = [
        {
            "prompt": prompt,
            "step": ckpt.step,
            "checkpoint": ckpt.path.name,
            "strength": strength,
            "box": list(layout.cells[z][y][x]),
        }
        for z, prompt in enumerate(prompts)
        for y, strength in enumerate(strengths)
        for x, ckpt in enumerate(ckpts)
    ]
    description = {
        "base_model": base_model,
        "seed": seed,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
        "resolution": resolution,
        "dtype": dtype,
        "axes": {
            "x": {"name": "step", "values": [c.step for c in ckpts]},
            "y": {"name": "strength", "values": strengths},
            "z": {"name": "prompt", "values": list(prompts)},
        },
        "checkpoints": [{"file": c.path.name, "step": c.step} for c in ckpts],
        "layout": {
            "width": layout.width,
            "height": layout.height,
            "cell_size": layout.cell,
            "scale": layout.scale,
        },
        "cells": cells,
        "labels": labels,
    }
    with atomic_path(out_png) as tmp:
        canvas.save(tmp, format="PNG")
    write_json(out_json, description)
