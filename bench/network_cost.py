"""What the network and gradient checkpointing cost (issue #12), on the SD1.5 architecture
(bench/build_sd15.py builds it with random weights).

Every run is loramill.train.loop.train_lora in a fresh subprocess (bench/train_real_size.py's
child), UNet LoRA rank 4, batch 1, fp32, warm latent and text caches:

  (a) s/step at 256 px: network_target attention (128 UNet modules) against kohya (192),
      interleaved for --repeats rounds; the median over rounds of kohya / attention within
      the round, so load that comes and goes cancels out.
  (b) gradient checkpointing at --gc-resolution px: peak RSS of the training loop (the
      process's peak; the load phase's peak is printed beside it) and s/step, kohya network,
      with and without. Target: a lower peak with checkpointing.

Exits 1 when (b)'s target is missed.

    .venv/bin/python bench/build_sd15.py /tmp/sd15
    .venv/bin/python bench/network_cost.py --model /tmp/sd15 --workdir /tmp/lm-network \
        [--repeats 2] [--warm 1] [--timed 4] [--gc-resolution 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_real_size import fresh, prepare_dataset, run_child, train_spec


def prime(model: str, data: Path, work: Path, cache: Path, label: str) -> None:
    """One short run fills the caches, so no timed run encodes anything."""
    run_dir = fresh(work / f"run-{label}-prime")
    run_child(train_spec(model, data, run_dir, cache, max_train_steps=1, save_steps=1), work, label)


def measure(args: argparse.Namespace, resolution: int, configs: dict[str, dict]) -> dict:
    """Interleaved rounds of every config: per-round median s/step, and peaks."""
    work, steps = args.workdir, args.warm + args.timed
    data = prepare_dataset(work, 4, resolution)
    cache = work / f"cache-{resolution}"
    prime(args.model, data, work, cache, f"prime-{resolution}")
    out: dict[str, dict[str, list]] = {
        name: {"round_s": [], "peak_mib": [], "load_mib": []} for name in configs
    }
    for repeat in range(1, args.repeats + 1):
        for name, config in configs.items():
            run_dir = fresh(work / f"run-{resolution}-{name}")
            spec = train_spec(
                args.model, data, run_dir, cache, max_train_steps=steps, save_steps=steps, **config
            )
            child = run_child(spec, work, f"{resolution}-r{repeat}-{name}")
            if not child.line("latents: ").startswith("0 encoded"):
                sys.exit(f"{name} encoded latents: the cache was not warm")
            out[name]["round_s"].append(statistics.median(child.result["steps"][args.warm :]))
            out[name]["peak_mib"].append(child.peak_mib)
            out[name]["load_mib"].append(child.result["hwm_before_loop_mib"])
            print(f"    median {out[name]['round_s'][-1]:.2f} s/step", flush=True)
    return out


def ratio(result: dict, over: str, under: str) -> float:
    pairs = zip(result[over]["round_s"], result[under]["round_s"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("--timed", type=int, default=4)
    parser.add_argument("--gc-resolution", type=int, default=512)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    print("(a) network_target at 256 px", flush=True)
    targets = {t: {"network_target": t} for t in ("attention", "kohya")}
    a = measure(args, 256, targets)
    print(f"\n(b) gradient checkpointing at {args.gc_resolution} px", flush=True)
    gc = {"plain": {"network_target": "kohya"}}
    gc["checkpointing"] = {**gc["plain"], "gradient_checkpointing": True}
    b = measure(args, args.gc_resolution, gc)

    print("\n(a) s/step at 256 px, per round:")
    for name, runs in a.items():
        print(f"  {name:10} " + " ".join(f"{s:.2f}" for s in runs["round_s"]))
    print(f"  kohya / attention (median of per-round ratios): {ratio(a, 'kohya', 'attention'):.2f}")
    print(f"\n(b) {args.gc_resolution} px, kohya network:")
    for name, runs in b.items():
        peak, load = max(runs["peak_mib"]) / 1024, max(runs["load_mib"]) / 1024
        times = " ".join(f"{s:.2f}" for s in runs["round_s"])
        print(f"  {name:13} s/step {times}; peak RSS {peak:.2f} GiB (load phase {load:.2f})")
    slower = ratio(b, "checkpointing", "plain")
    peaks = [max(b[name]["peak_mib"]) for name in ("checkpointing", "plain")]
    print(f"  checkpointing / plain: s/step {slower:.2f}, peak {peaks[0] / peaks[1]:.3f}")
    (args.workdir / "result.json").write_text(json.dumps({"a": a, "b": b}, indent=2))
    if peaks[0] >= peaks[1]:
        print("TARGET MISSED: gradient checkpointing did not lower the peak")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
