"""One-GPU training smoke run: loramill.train.loop.train_lora on CUDA, SD1.5 architecture.

For each mixed_precision (no, bf16, fp16) and batch size: seconds per step (the difference
between a long and a short run over their step difference, so loading and latent encoding
cancel out), peak GPU memory (torch.cuda.max_memory_allocated), and whether every LoRA weight
of the final checkpoint is finite and moved from its start. Exits 1 when one is not.

    .venv/bin/python bench/build_sd15.py /tmp/sd15
    .venv/bin/python bench/train_gpu.py --model /tmp/sd15 --workdir /tmp/lm-gpu \
        [--resolution 512] [--images 8] [--short 4] [--long 24] [--batch 1 4]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_real_size import prepare_dataset


def run(
    args: argparse.Namespace, data: Path, steps: int, config: dict
) -> tuple[float, float, Path]:
    """(seconds, peak GiB, final checkpoint) of one training from scratch, warm latent cache."""
    import torch

    from loramill.train.loop import train_lora

    out = args.workdir / "run"
    shutil.rmtree(out, ignore_errors=True)
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    written = train_lora(
        data / "resized", data / "captions.jsonl", out / "checkpoints", out / "tb", args.model,
        {**config, "max_train_steps": steps, "save_steps": steps}, trigger="zzt",
        device="cuda", cache_root=args.workdir / "cache",
    )  # fmt: skip
    torch.cuda.synchronize()
    return time.perf_counter() - start, torch.cuda.max_memory_allocated() / 2**30, written[-1]


def trained(path: Path) -> bool:
    """Every LoRA weight finite, and the up-weights (zero at the start) no longer all zero."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    finite = all(bool(t.isfinite().all()) for t in tensors.values())
    moved = any(bool(t.abs().sum() > 0) for k, t in tensors.items() if "lora_B" in k)
    return finite and moved


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--short", type=int, default=4)
    parser.add_argument("--long", type=int, default=24)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    args = parser.parse_args()
    from loramill.reruns.runner import quiet_libraries

    quiet_libraries()
    data = prepare_dataset(args.workdir, args.images, args.resolution)
    results, ok = [], True
    for batch in args.batch:
        for precision in ("no", "bf16", "fp16"):
            config = {"rank": 16, "alpha": 8, "learning_rate": 1e-4, "threads": 8,
                      "train_batch_size": batch, "mixed_precision": precision}  # fmt: skip
            run(args, data, 1, config)  # fills the latent cache and warms CUDA
            short, _, _ = run(args, data, args.short, config)
            long, peak, final = run(args, data, args.long, config)
            good = trained(final)
            ok &= good
            results.append({
                "batch": batch, "mixed_precision": precision,
                "s_per_step": round((long - short) / (args.long - args.short), 3),
                "peak_gib": round(peak, 2), "finite_and_trained": good,
            })  # fmt: skip
            print(json.dumps(results[-1]), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
