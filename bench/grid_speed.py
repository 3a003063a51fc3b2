"""Grid cells per second (issue #14): loramill's grid stage against a naive loop, same run.

The naive loop is what a script without the grid stage does: for every cell load the base
pipeline, move it to the device, load the cell's LoRA, set its strength, render one image.
loramill's stage (loramill.grid.build.render_grid, empty per-cell cache) loads the pipeline once,
each checkpoint's LoRA once, draws the strength-0 cells (the base model) once per prompt and
seed, and batches cells of one checkpoint and strength on a GPU. Then one strength value is
added and the grid drawn again: only the new cells may be rendered.

Both sides start primed (see prime). Model: the SD1.5 architecture with random weights
(bench/build_sd15.py); checkpoints: random kohya-network LoRAs (rank 16) saved as training
saves them. Target: ours / naive cells/s >= 2. Exits 1 when it is missed or add-one renders
anything but the new cells.

    .venv/bin/python bench/build_sd15.py /tmp/sd15
    .venv/bin/python bench/grid_speed.py --model /tmp/sd15 --workdir /tmp/lm-grid \
        [--device cpu|cuda] [--checkpoints 3] [--prompts 2] [--strengths 0 0.5 1] \
        [--steps 10] [--resolution 256] [--dtype float32]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
from pathlib import Path

PROMPTS = ["a red circle on a white background", "a blue square on a black background",
           "a green band on black", "a photo of a cat"]  # fmt: skip


def make_checkpoints(model: str, folder: Path, count: int) -> list[Path]:
    """Random checkpoints, returned as kohya files (what the grid stage reads: the export's)."""
    import torch
    from safetensors.torch import save_file

    from loramill.export.write import to_kohya
    from loramill.models.base_model import load_pipeline
    from loramill.models.checkpoint import STEP_KEY, read_checkpoint, save_checkpoint, step_name
    from loramill.models.network import NetworkSpec, add_lora

    folder.mkdir(parents=True, exist_ok=True)
    pipe = load_pipeline(model)
    paths = []
    for n in range(1, count + 1):
        torch.manual_seed(n)
        if n > 1:
            pipe = load_pipeline(model)
        models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
        add_lora(models, NetworkSpec("kohya", 16, 8.0), init=False)
        path = folder / step_name(100 * n)
        step = {STEP_KEY: str(100 * n)}
        save_checkpoint(path, models, step)
        kohya = folder / f"bench-{100 * n:06d}.safetensors"
        save_file(to_kohya(read_checkpoint(path)), str(kohya), metadata=step)
        paths.append(kohya)
    return paths


def prime(model: str, settings: dict, device: str) -> None:
    """What both sides find in a workflow run: the base model's hash in the hash cache (the
    planner computed it for the stage's fingerprint) and, on a GPU, an initialised device
    (one throwaway render, so neither side pays CUDA's start-up)."""
    import torch

    from loramill.hashing import DEFAULT_DB, HashCache
    from loramill.model_files import base_model_fingerprint
    from loramill.models.base_model import load_pipeline

    base_model_fingerprint(model, HashCache(DEFAULT_DB))
    if device == "cuda":
        pipe = load_pipeline(model, settings["dtype"]).to(device)
        size = settings["resolution"]
        pipe("warm-up", num_inference_steps=1, height=size, width=size)
        del pipe
        torch.cuda.synchronize()


def naive(model: str, paths: list[Path], settings: dict, device: str) -> float:
    """Seconds for every cell of the grid, each from a freshly loaded pipeline and LoRA."""
    import torch

    from loramill.models.base_model import load_pipeline

    res = settings["resolution"]
    start = time.perf_counter()
    for prompt in settings["prompts"]:
        for strength in settings["strengths"]:
            for path in paths:
                pipe = load_pipeline(model, settings["dtype"]).to(device)
                if strength:
                    pipe.load_lora_weights(str(path), adapter_name="c")
                    pipe.set_adapters(["c"], [strength])
                pipe(prompt, num_inference_steps=settings["num_inference_steps"],
                     guidance_scale=settings["guidance_scale"], height=res, width=res,
                     generator=torch.Generator("cpu").manual_seed(settings["seed"]))  # fmt: skip
                del pipe
                if device == "cuda":
                    torch.cuda.synchronize()
    return time.perf_counter() - start


def ours(model: str, paths: list[Path], settings: dict, out: Path, cache: Path, device: str):
    from loramill.grid.build import render_grid

    start = time.perf_counter()
    stats = render_grid(model, paths, settings, out / "grid.png", out / "grid.json",
                        out / "pages", name="bench", device=device, cache_dir=cache)  # fmt: skip
    return time.perf_counter() - start, stats


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--checkpoints", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch-size", default="auto")
    args = parser.parse_args()
    from loramill.reruns.runner import quiet_libraries

    quiet_libraries()  # the naive loop's per-cell load reports would bury the result
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("loramill").setLevel(logging.INFO)  # the stage's own time breakdown
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    paths = make_checkpoints(args.model, work / "checkpoints", args.checkpoints)
    settings = {
        "x": "checkpoint", "y": "strength", "z": "prompt", "checkpoints": "all",
        "prompts": PROMPTS[: args.prompts], "strengths": args.strengths, "negative_prompt": "",
        "seed": 1234, "num_inference_steps": args.steps, "guidance_scale": 7.5,
        "sampler": "default", "resolution": args.resolution, "dtype": args.dtype,
        "batch_size": args.batch_size if args.batch_size == "auto" else int(args.batch_size),
        "max_megapixels": 64,
    }  # fmt: skip
    cells = args.checkpoints * args.prompts * len(args.strengths)
    prime(args.model, settings, args.device)
    ours_s, first = ours(args.model, paths, settings, work / "ours", work / "cache", args.device)
    naive_s = naive(args.model, paths, settings, args.device)
    more = {**settings, "strengths": [*args.strengths, 0.75]}
    add_s, added = ours(args.model, paths, more, work / "more", work / "cache", args.device)
    new_cells = args.checkpoints * args.prompts
    result = {
        "device": args.device, "dtype": args.dtype, "cells": cells,
        "grid": f"{args.checkpoints} checkpoints x {len(args.strengths)} strengths x "
                f"{args.prompts} prompts, {args.resolution} px, {args.steps} steps",
        "naive_s": round(naive_s, 2), "ours_s": round(ours_s, 2),
        "naive_cells_per_s": round(cells / naive_s, 4),
        "ours_cells_per_s": round(cells / ours_s, 4),
        "ratio": round(naive_s / ours_s, 2),
        "ours_rendered": first.rendered, "ours_reused": first.reused,
        "add_one_s": round(add_s, 2), "add_one_rendered": added.rendered,
        "add_one_reused": added.reused, "add_one_expected": new_cells,
    }  # fmt: skip
    print(json.dumps(result, indent=1))
    ok = result["ratio"] >= 2 and added.rendered == new_cells
    print(f"ratio {result['ratio']} (target >= 2); add-one rendered {added.rendered} of "
          f"{new_cells} new cells: {'PASS' if ok else 'FAIL'}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
