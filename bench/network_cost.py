"""What the network, its type and gradient checkpointing cost (issues #12 and #31), on the SD1.5
architecture (bench/build_sd15.py builds it with random weights).

Every run is loramill.train.loop.train_lora in a fresh subprocess (bench/train_real_size.py's
child), UNet LoRA rank 4, batch 1, fp32, warm latent and text caches:

  (a) s/step at 256 px: network_target attention (128 UNet modules) against kohya (192),
      interleaved for --repeats rounds; the median over rounds of kohya / attention within
      the round, so load that comes and goes cancels out.
  (b) gradient checkpointing at --gc-resolution px: peak RSS of the training loop (the
      process's peak; the load phase's peak is printed beside it) and s/step, kohya network,
      with and without. Target: a lower peak with checkpointing.
  (c) network types at 256 px, kohya network: s/step of lora, loha, lokr and dora per round
      (each over lora's within the round), the peak RSS, and the size of each last
      checkpoint's kohya export in fp32 and fp16 (export.save_precision).

Exits 1 when (b)'s target is missed. ``--parts`` picks the parts (default ab; c: the types).

    .venv/bin/python bench/build_sd15.py /tmp/sd15
    .venv/bin/python bench/network_cost.py --model /tmp/sd15 --workdir /tmp/lm-network \
        [--parts abc] [--repeats 2] [--warm 1] [--timed 4] [--gc-resolution 512]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_real_size import fresh, prepare_dataset, run_child, train_spec

TYPES = ("lora", "loha", "lokr", "dora")  # train.network_type


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
        name: {"round_s": [], "peak_mib": [], "load_mib": [], "checkpoint": []} for name in configs
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
            out[name]["checkpoint"].append(child.result["checkpoint"])
            print(f"    median {out[name]['round_s'][-1]:.2f} s/step", flush=True)
    return out


def ratio(result: dict, over: str, under: str) -> float:
    pairs = zip(result[over]["round_s"], result[under]["round_s"], strict=True)
    return statistics.median(a / b for a, b in pairs)


def export_sizes(checkpoint: str, work: Path) -> dict[str, int]:
    """Bytes of a checkpoint's kohya export in fp32 and fp16."""
    from loramill.export.write import export_adapter

    sizes = {}
    for precision in ("fp32", "fp16"):
        path = work / f"export-{precision}.safetensors"
        export_adapter(checkpoint, path, None, "bench", save_precision=precision)
        sizes[precision] = path.stat().st_size
    return sizes


def network_types(args: argparse.Namespace) -> dict:
    """(c): every network type on the kohya network at 256 px, and its export's size."""
    types = {kind: {"network_target": "kohya", "network_type": kind} for kind in TYPES}
    c = measure(args, 256, types)
    print("\n(c) network types, kohya network, 256 px:")
    for kind, runs in c.items():
        runs["export_bytes"] = export_sizes(runs["checkpoint"][-1], args.workdir)
        times = " ".join(f"{s:.2f}" for s in runs["round_s"])
        mib = {p: size / 2**20 for p, size in runs["export_bytes"].items()}
        print(f"  {kind:5} s/step {times} ({ratio(c, kind, 'lora'):.2f}× lora); peak RSS "
              f"{max(runs['peak_mib']) / 1024:.2f} GiB; export {mib['fp32']:.1f} MiB fp32, "
              f"{mib['fp16']:.1f} MiB fp16")  # fmt: skip
    return c


def targets_and_checkpointing(args: argparse.Namespace) -> tuple[dict, dict, bool]:
    """(a) and (b); whether (b)'s target is met."""
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
    return a, b, peaks[0] < peaks[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--parts", default="ab", help="a, b (targets, checkpointing), c (types)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--warm", type=int, default=1)
    parser.add_argument("--timed", type=int, default=4)
    parser.add_argument("--gc-resolution", type=int, default=512)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    results, met = {}, True
    if {"a", "b"} & set(args.parts):
        results["a"], results["b"], met = targets_and_checkpointing(args)
    if "c" in args.parts:
        results["c"] = network_types(args)
    (args.workdir / "result.json").write_text(json.dumps(results, indent=2))
    if not met:
        print("TARGET MISSED: gradient checkpointing did not lower the peak")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
