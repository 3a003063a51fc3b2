"""The validate stage at real size (issue #32): its memory is bounded by the batch.

On the SD1.5 architecture (bench/build_sd15.py, random weights), one checkpoint of a 1-step
run is measured on 8 and on 64 validation images at 512 px, batch 1, each from an empty latent
cache (encoding included), each in a fresh interpreter (bench/train_real_size.py's runner: its
peak RSS is its own). Target: the 64-image peak within 15 % of the 8-image peak. Also: seconds
per image, and that a second validation of the 8 images gives the same numbers.

    .venv/bin/python bench/build_sd15.py /tmp/sd15
    .venv/bin/python bench/validate_real_size.py --model /tmp/sd15 --workdir /tmp/lm-validate
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import train_real_size as real

MEMORY_TARGET = 1.15  # 64-image peak / 8-image peak


def child_validate(spec: dict[str, Any]) -> dict[str, Any]:
    import logging

    from loramill.train.validation import validate_checkpoints

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")

    start = time.perf_counter()
    result = validate_checkpoints(**spec["args"], device="cpu")
    return {"wall": time.perf_counter() - start, "result": result}


def validate_spec(model: str, data: Path, checkpoints: Path, out: Path, cache: Path) -> dict:
    args = {
        "checkpoints_dir": str(checkpoints),
        "resized_dir": str(data / "resized"),
        "captions_jsonl": str(data / "captions.jsonl"),
        "result_json": str(out / "validation.json"),
        "plot_png": str(out / "validation.png"),
        "logdir": str(out / "tb"),
        "base_model": model,
        "config": real.BASE_CONFIG,
        "folder": str(data),
        "cache_root": str(cache),
    }
    return {"kind": "validate", "args": args}


def run(spec: dict, work: Path, label: str) -> real.Child:
    command = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    return real.run_child(spec, work, label, command=command)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/sd15", help="bench/build_sd15.py's output")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lm-validate"))
    parser.add_argument("--images", type=int, nargs=2, default=(8, 64))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec["kind"] == "validate":
            print(real.RESULT + json.dumps(child_validate(spec)), flush=True)
        else:
            real.child_main(spec)
        return 0
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    source = real.source_fingerprint()
    run({"kind": "hash", "model": args.model}, work, "hash-model")
    small, large = (real.prepare_dataset(work, n, 512) for n in args.images)
    trained = real.fresh(work / "run")
    spec = real.train_spec(args.model, small, trained, real.fresh(work / "train-cache"),
                           max_train_steps=1, save_steps=1)  # fmt: skip
    run(spec, work, "train-1-step")
    peaks, losses = {}, []
    for label, data in ((args.images[0], small), (args.images[1], large), ("again", small)):
        out, cache = real.fresh(work / f"v-{label}"), real.fresh(work / f"cache-{label}")
        child = run(validate_spec(args.model, data, trained / "checkpoints", out, cache),
                    work, f"validate-{label}")  # fmt: skip
        images = len(child.result["result"]["images"])
        print(f"  {label}: {images} images, {child.result['wall'] / images:.2f} s/image "
              f"(encoding included), {child.line('latents: ')}")  # fmt: skip
        peaks[label] = child.peak_mib
        losses.append(child.result["result"]["checkpoints"])
    ratio = peaks[args.images[1]] / peaks[args.images[0]]
    same = losses[0] == losses[2]
    met = ratio <= MEMORY_TARGET and same and real.source_fingerprint() == source
    print(f"peak {args.images[1]}/{args.images[0]} images: {ratio:.3f} (target ≤ "
          f"{MEMORY_TARGET}); a second validation the same: {same}: "
          f"{'met' if met else 'MISSED'}")  # fmt: skip
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
