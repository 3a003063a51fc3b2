"""The evaluation grid job: plan the cells, render what the per-cell cache lacks, compose pages.

Planning (loramill.grid.plan) and composing (loramill.grid.layout) are pure; rendering
(loramill.grid.render) is the only part that loads a model, and it loads one only when a cell
is missing from the cache. Images go through the cache and are read back page by page, so the
job's memory is bounded by one page and one pipeline batch, never by the grid.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from loramill import LoramillError
from loramill.files import atomic_path, read_jsonl, write_bytes, write_json
from loramill.grid.layout import Labels, cell_scale, compose, grid_font, layout, paginate, png_info
from loramill.grid.plan import (
    POSITIONS,
    Cell,
    Plan,
    batches,
    caption_prompts,
    check_family,
    plan_grid,
)
from loramill.grid.render import (
    CACHE_DIR,
    CellCache,
    RenderContext,
    Renderer,
    adapter_hash,
    read_adapter,
)
from loramill.hashing import DEFAULT_DB, HashCache
from loramill.model_files import base_model_fingerprint
from loramill.models.checkpoint import STEP_KEY

log = logging.getLogger("loramill.grid.build")


@dataclass(frozen=True)
class GridStats:
    rendered: int  # images rendered by this job
    reused: int  # cells taken from the cache or shared with an equal cell (strength 0)
    pages: int


def read_steps(paths: list[str | os.PathLike]) -> dict[int, Path]:
    """step -> adapter file, read from each file's metadata before any model loads (the
    export keeps the checkpoint's ``loramill.`` metadata)."""
    from safetensors import SafetensorError, safe_open

    steps: dict[int, Path] = {}
    for path in map(Path, paths):
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except (OSError, SafetensorError) as error:
            raise LoramillError(f"{path}: cannot read adapter ({error})") from None
        try:
            step = int(metadata[STEP_KEY])
        except (KeyError, ValueError):
            raise LoramillError(f"{path}: no integer '{STEP_KEY}' in its metadata") from None
        if step in steps:
            raise LoramillError(f"{path} and {steps[step]} are both step {step}")
        steps[step] = path
    return steps


def _render_missing(
    cells: list[Cell], keys: dict[Cell, str], cache: CellCache, steps: dict[int, Path],
    pipeline: dict[str, Any], batch_size: int,
) -> int:  # fmt: skip
    """Render the cells the cache lacks (each distinct key once); return how many."""
    missing = list({keys[c]: c for c in cells if not cache.has(keys[c])}.values())
    if not missing:
        return 0  # nothing to draw: no model is loaded
    from loramill.devices import resolve_device
    from loramill.models.base_model import load_pipeline, pipeline_family

    start = time.perf_counter()
    pipe = load_pipeline(pipeline["base_model"], pipeline["dtype"], pipeline["allow_unsafe"])
    pipe.to(resolve_device(pipeline["device"]))
    log.info("base model loaded in %.1f s", time.perf_counter() - start)
    # the loaded pipeline's family: FLUX.1 [schnell]'s default T5 length is not [dev]'s
    how = pipeline_family(pipe).conditioning(SimpleNamespace(**pipeline["text"]))
    renderer = Renderer(pipe, how)
    loaded: int | None = None
    groups = batches(missing, batch_size)
    start = time.perf_counter()
    for batch in groups:
        step = batch[0].adapter_step
        if step != loaded:
            renderer.use_adapter(step, steps.get(step))
            loaded = step
        for cell, image in zip(batch, renderer.render(batch), strict=True):
            cache.put(keys[cell], image)
    elapsed = time.perf_counter() - start
    log.info("%d cells in %d pipeline calls, %.1f s", len(missing), len(groups), elapsed)
    return len(missing)


def _cached(cache: CellCache, key: str) -> Any:
    image = cache.get(key)
    if image is None:
        raise LoramillError(
            f"grid: cached cell {key[:12]} vanished while the grid was drawn (a concurrent "
            "`make gc`?); run the grid again"
        )
    return image


def _axes_description(plan: Plan) -> dict[str, Any]:
    return {
        position: {"name": axis.name, "values": list(axis.values), "labels": list(axis.labels)}
        for position, axis in zip(POSITIONS, (plan.x, plan.y, plan.z), strict=True)
        if axis.name
    }


def _parameters(plan: Plan, base_model: str) -> str:
    """AUTOMATIC1111's ``parameters`` text for a grid: the first cell and the axes."""
    cell = plan.cells[0][0][0]
    axes = ", ".join(
        f"{p.upper()} Type: {a.name}, {p.upper()} Values: {', '.join(a.labels)}"
        for p, a in zip(POSITIONS, (plan.x, plan.y, plan.z), strict=True)
        if a.name
    )
    return (
        f"{cell.prompt}\nNegative prompt: {cell.negative_prompt}\n"
        f"Steps: {cell.num_inference_steps}, Sampler: {cell.sampler}, "
        f"CFG scale: {cell.guidance_scale:g}, Seed: {cell.seed}, "
        f"Size: {cell.resolution}x{cell.resolution}, Model: {base_model}, "
        f"Script: X/Y/Z plot, {axes}"
    )


def _page_paths(pages_dir: Path | None, count: int) -> list[Path | None]:
    # Named by number only: a renamed dataset's grid is the same grid, restored, not redrawn.
    if count > 1 and pages_dir is None:
        raise LoramillError(f"grid: {count} pages but no folder to write them to")
    return [pages_dir / f"page-{n}.png" if pages_dir else None for n in range(1, count + 1)]


def with_caption_prompts(
    settings: dict[str, Any], captions_jsonl: list[str | os.PathLike], name: str = "grid"
) -> dict[str, Any]:
    """``settings`` with the dataset's first training captions as prompts when it sets none
    (the rule then passes ``results/<ds>/captions.jsonl``, and only then)."""
    if settings.get("prompts"):
        return settings
    if not captions_jsonl:
        raise LoramillError("grid.prompts: none set and no training captions given")
    prompts = caption_prompts([r["caption"] for r in read_jsonl(captions_jsonl[0])], settings)
    log.info("grid %s: no grid.prompts set; prompts from its captions: %s", name, prompts)
    return {**settings, "prompts": prompts}


def text_options(family: Any, train: Mapping[str, Any]) -> dict[str, Any]:
    """The train options that decide how ``family`` (its code) reads a prompt, as ``train``
    sets them (unset ones: their defaults): the fields of the family's conditioning (SD's
    clip_skip and max_token_length, Flux's t5xxl_max_token_length)."""
    from loramill.train.config import TrainConfig

    options = TrainConfig.from_dict(dict(train))
    how = family.conditioning(options)
    return {field.name: getattr(options, field.name) for field in fields(how)}


def render_context(
    base_model: str, settings: dict[str, Any], device: str = "auto",
    train: Mapping[str, Any] | None = None, allow_unsafe_weights: bool = False,
    hashes: HashCache | None = None,
) -> RenderContext:  # fmt: skip
    """What every cell of a grid shares. The base model is named by the files its loader reads
    (as the stages' fingerprints name it): a README or ``.git/`` beside them redraws nothing.
    ``train``: the train options prompts are read with (unset ones: their defaults)."""
    from loramill.devices import resolve_device
    from loramill.models.base_model import base_family

    device_type = resolve_device(device).type
    batch_size = settings.get("batch_size", "auto")
    if batch_size == "auto":  # batched cells differ from single ones by float rounding
        batch_size = 1 if device_type == "cpu" else 8
    fingerprint = base_model_fingerprint(
        base_model, hashes or HashCache(DEFAULT_DB), allow_unsafe_weights
    )
    text = text_options(base_family(base_model), train or {})
    return RenderContext(fingerprint, settings["dtype"], device_type, int(batch_size), text)


def render_grid(
    base_model: str,
    adapters: list[str | os.PathLike],
    settings: dict[str, Any],
    out_png: str | os.PathLike,
    out_json: str | os.PathLike,
    pages_dir: str | os.PathLike | None = None,
    *,
    name: str = "grid",
    prompt_reading: Mapping[str, Any] | None = None,
    allow_unsafe_weights: bool = False,
    device: str = "auto",
    cache_dir: str | os.PathLike = CACHE_DIR,
) -> GridStats:
    """Write the grid's pages (``pages_dir/page-N.png``; the first also to ``out_png``) and
    ``out_json``; ``name`` (the dataset) is for the log line only.

    ``adapters``: the export's kohya files, one per step (``exports/<ds>-steps/``); for
    FLUX.1 and Chroma, diffusers-format files (the training checkpoints).
    ``settings``: the grid config (axes x/y/z, prompts with ``{trigger}`` resolved, strengths,
    seed, …, resolution, dtype, batch_size, max_megapixels).
    ``prompt_reading``: the train options the adapters were trained with that decide how a
    caption is read (PROMPT_OPTIONS; unset ones: their defaults, those of other families are
    ignored), which the grid reads its prompts with.
    """
    from loramill.models.base_model import base_family

    check_family(settings, base_family(base_model).name)  # before any file is read
    steps = read_steps(adapters)
    plan = plan_grid(settings, list(steps))
    cells = plan.all_cells()
    used_steps = sorted({c.adapter_step for c in cells} - {None})
    hashes = {step: adapter_hash(read_adapter(steps[step])) for step in used_steps}
    context = render_context(base_model, settings, device, prompt_reading, allow_unsafe_weights)
    keys = {cell: context.cell_key(cell, hashes.get(cell.step)) for cell in cells}
    cache = CellCache(cache_dir)
    pipeline = {
        "base_model": base_model, "dtype": settings["dtype"], "device": device,
        "allow_unsafe": allow_unsafe_weights, "text": context.text,
    }  # fmt: skip
    rendered = _render_missing(cells, keys, cache, steps, pipeline, context.batch_size)
    log.info("grid %s: %d rendered, %d reused", name, rendered, len(cells) - rendered)

    description = {
        "base_model": base_model,
        "base_model_hash": context.base_model_hash,
        "render": {**context.describe(), "software": context.software()},
        "axes": _axes_description(plan),
        "checkpoints": [
            {"step": s, "file": steps[s].name, "adapter_hash": hashes[s]} for s in used_steps
        ],
    }
    pages = _write_pages(plan, keys, cache, settings, Path(out_png), pages_dir, name, description)
    write_json(out_json, {**description, "pages": pages[0], "cells": pages[1]})
    return GridStats(rendered, len(cells) - rendered, len(pages[0]))


def _write_pages(
    plan: Plan, keys: dict[Cell, str], cache: CellCache, settings: dict[str, Any],
    out_png: Path, pages_dir: str | os.PathLike | None, name: str, description: dict[str, Any],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:  # fmt: skip
    """Compose and write every page; return the pages' and the cells' descriptions."""
    resolution = max(c.resolution for c in plan.all_cells())
    scale = cell_scale(resolution)
    font = grid_font(resolution * scale)
    labels = Labels(plan.x.labels, plan.y.labels, plan.z.labels)
    max_pixels = int(float(settings.get("max_megapixels", 64)) * 1_000_000)
    pages = paginate(resolution * scale, labels, font, max_pixels)
    paths = _page_paths(Path(pages_dir) if pages_dir else None, len(pages))
    if pages_dir is not None:
        Path(pages_dir).mkdir(parents=True, exist_ok=True)
    page_info, cell_info = [], []
    parameters = _parameters(plan, description["base_model"])
    for number, (page, path) in enumerate(zip(pages, paths, strict=True), start=1):
        # Page 1 is also out_png, the picture the model card and the README show.
        targets = [p for p in (out_png if number == 1 else None, path) if p is not None]
        shape = layout(resolution * scale, labels, page, font)
        images = {cell: _cached(cache, keys[plan.cells[cell[0]][cell[1]][cell[2]]])
                  for cell in shape.cells}  # fmt: skip
        canvas, drawn = compose(shape, images, scale, font)
        entry = {"page": number, "file": targets[-1].name, "width": shape.width,
                 "height": shape.height, "labels": drawn}  # fmt: skip
        for (z, y, x), box in shape.cells.items():
            cell = plan.cells[z][y][x]
            cell_info.append({**asdict(cell), "page": number, "box": list(box),
                              "index": [z, y, x], "key": keys[cell]})  # fmt: skip
        with atomic_path(targets[0]) as tmp:
            # the page's own file name stays out: renaming a page keeps its bytes valid
            chunk = {**description, **{k: v for k, v in entry.items() if k != "file"}}
            canvas.save(tmp, format="PNG", pnginfo=png_info(parameters, chunk))
        for extra in targets[1:]:
            write_bytes(extra, targets[0].read_bytes())
        page_info.append(entry)
    return page_info, cell_info
