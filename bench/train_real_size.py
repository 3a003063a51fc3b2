"""Training at real size (issue #6): memory, step time and cache reuse on the SD1.5
architecture (bench/build_sd15.py builds it with random weights).

Every measurement runs loramill.train.loop.train_lora (or the baseline loop) in a fresh
subprocess, so its peak RSS (os.wait4's ru_maxrss) is its own:

  (a) memory  peak RSS at 512 px, batch 1, rank 4, 2 steps, with 8 and with 64 images, each
              from an empty latent cache (encoding included), and the encode time per image.
              Target: the 64-image peak within 15 % of the 8-image peak.
  (b) steps   seconds per step at 256 px, batch 1, UNet-only LoRA rank 4, fp32, warm cache,
              against a baseline doing what diffusers' train_text_to_image_lora.py does each
              step (VAE encode + text encoder forward, then the same UNet LoRA step),
              interleaved ours / baseline for --repeats rounds. Target: the median over rounds
              of baseline / ours within the round ≥ 1.4, and ours' peak RSS not above the
              baseline's. --bf16 adds ours in bf16 mixed
              precision (reported separately: a different precision from the fp32 baseline).
  (c) reuse   a second training of the 8 images of (a) with another learning rate, on the
              same cache: its log must say "latents: 0 encoded".

Exits 1 when a target is missed or src/loramill changed during the run.

    .venv/bin/python bench/build_sd15.py /tmp/sd15
    .venv/bin/python bench/train_real_size.py --model /tmp/sd15 --workdir /tmp/lm-bench \
        [--repeats 3] [--warm 2] [--timed 8] [--bf16] [--skip-memory] [--skip-steps]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
MEMORY_TARGET = 1.15  # 64-image peak / 8-image peak
SPEED_TARGET = 1.4  # baseline s/step / ours s/step
RESULT = "RESULT "
BASE_CONFIG = {
    "network_target": "attention",  # what the diffusers example trains
    "rank": 4,
    "alpha": 4,
    "learning_rate": 1e-4,
    "train_batch_size": 1,
    "train_text_encoder": False,
    "mixed_precision": "no",
    "seed": 42,
    "threads": 2,
}


# ---------------------------------------------------------------- child side (one process each)


def proc_status_mib(field_name: str) -> float:
    """VmHWM / VmRSS of this process, MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    """train_lora with timers around the encoders and Training.step (patched in this process
    only: the project's code runs unchanged)."""
    from loramill.train import data as train_data
    from loramill.train import loop as train

    timings: dict[str, Any] = {"steps": [], "encode": {}}

    def timed(name: str, function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            counts = function(*args, **kwargs)
            # called once per bucket (latents): the phase's totals
            seconds, encoded = timings["encode"].get(name, (0.0, 0))
            timings["encode"][name] = (
                seconds + time.perf_counter() - start,
                encoded + counts.encoded,
            )
            return counts

        return wrapper

    train_data.encode_latents = timed("latents", train_data.encode_latents)
    train_data.encode_texts = timed("texts", train_data.encode_texts)
    step, init = train.Training.step, train.Training.__init__

    def timed_step(self: Any) -> float:
        profile = spec.get("profile")  # {"step": n, "out": path}: that step under the profiler
        profiled = None
        if profile and len(timings["steps"]) + 1 == profile["step"]:
            from step_profile import StepProfile

            denoiser = self.models[self.family.denoiser]
            profiled = StepProfile(denoiser, profile["out"], "loramill")
            profiled.start()
        start = time.perf_counter()
        loss = step(self)
        timings["steps"].append(time.perf_counter() - start)
        if profiled:
            profiled.stop()
        return loss

    def noted_init(self: Any, *args: Any, **kwargs: Any) -> None:
        # The peak so far is the load-and-encode phase's: the loop has not started.
        timings["hwm_before_loop_mib"] = proc_status_mib("VmHWM")
        init(self, *args, **kwargs)

    train.Training.step, train.Training.__init__ = timed_step, noted_init
    start = time.perf_counter()
    written = train.train_lora(**spec["args"], device="cpu")
    timings["wall"] = time.perf_counter() - start
    timings["checkpoint"] = str(written[-1])
    return timings


class BaselineLoop:
    """What diffusers' examples/text_to_image/train_text_to_image_lora.py does per step:
    VAE encode of the batch's pixels and text encoder forward of its caption every step,
    then the UNet LoRA forward / backward / clip / AdamW step."""

    def __init__(self, model: str, dataset: Path, rank: int, seed: int) -> None:
        import torch
        from diffusers import DDPMScheduler
        from diffusers.optimization import get_scheduler

        from loramill.files import read_jsonl
        from loramill.models.base_model import load_pipeline
        from loramill.models.network import NetworkSpec, add_lora

        pipe = load_pipeline(model)
        self.vae, self.text_encoder, self.tokenizer = pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.vae.requires_grad_(False)
        self.text_encoder.requires_grad_(False)
        self.unet = pipe.unet
        torch.manual_seed(seed)
        add_lora({"unet": self.unet}, NetworkSpec("attention", rank, rank))
        self.unet.train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.lr_scheduler = get_scheduler("constant", optimizer=self.optimizer)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        records = read_jsonl(dataset / "captions.jsonl")
        self.examples = [(dataset / "resized" / r["image"], r["caption"]) for r in records]
        self.order = torch.randperm(len(self.examples)).tolist()

    def step(self, index: int) -> float:
        import torch
        import torch.nn.functional as F

        from loramill.train.latents import read_pixels

        path, caption = self.examples[self.order[index % len(self.order)]]
        with torch.no_grad():
            latents = self.vae.encode(read_pixels([path])).latent_dist.sample()
            latents = latents * self.vae.config.scaling_factor
            ids = self.tokenizer(
                caption,
                padding="max_length",
                max_length=self.tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            hidden = self.text_encoder(ids, return_dict=False)[0]
        noise = torch.randn_like(latents)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],))
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, hidden, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def child_baseline(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    start = time.perf_counter()
    loop = BaselineLoop(spec["model"], Path(spec["dataset"]), spec["rank"], spec["seed"])
    times = []
    for index in range(spec["steps"]):
        begin = time.perf_counter()
        loop.step(index)
        times.append(time.perf_counter() - begin)
    return {"steps": times, "wall": time.perf_counter() - start}


def child_hash(spec: dict[str, Any]) -> dict[str, Any]:
    """Hash the 4 GiB model once into the shared hash cache, so no measurement pays it."""
    from loramill.hashing import DEFAULT_DB, HashCache
    from loramill.model_files import base_model_fingerprint

    start = time.perf_counter()
    fingerprint = base_model_fingerprint(spec["model"], HashCache(DEFAULT_DB))
    return {"hash": fingerprint, "wall": time.perf_counter() - start}


def child_main(spec: dict[str, Any]) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(name)s: %(message)s")
    run = {"train": child_train, "baseline": child_baseline, "hash": child_hash}[spec["kind"]]
    print(RESULT + json.dumps(run(spec)), flush=True)


# ---------------------------------------------------------------- parent side


@dataclass
class Child:
    result: dict[str, Any]
    peak_mib: float
    seconds: float
    lines: list[str] = field(default_factory=list)

    def line(self, prefix: str) -> str:
        """What follows ``prefix`` in the first log line holding it ("" if none)."""
        found = (x for x in self.lines if prefix in x and not x.startswith(RESULT))
        return next(found, prefix).split(prefix, 1)[1]


def run_child(
    spec: dict[str, Any],
    work: Path,
    label: str,
    command: list[str] | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> Child:
    """Run one measurement in a fresh interpreter (this file's child side with ``spec``, or
    ``command``, which prints the same RESULT line); its output goes to work/logs/<label>.log."""
    (work / "logs").mkdir(exist_ok=True)
    log_path = work / "logs" / f"{label}.log"
    command = command or [
        sys.executable,
        str(Path(__file__).resolve()),
        "--child",
        json.dumps(spec),
    ]
    start = time.perf_counter()
    with open(log_path, "w") as log:
        # cwd=work: the project keeps its hash database under ./.cache
        process = subprocess.Popen(
            command, cwd=cwd or work, env=env or ENV, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )  # fmt: skip
        lines = []
        for line in process.stdout:
            log.write(line)
            lines.append(line.rstrip("\n"))
        # wait4 gives this child's own rusage; RUSAGE_CHILDREN would be the max over all.
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    results = [x for x in lines if x.startswith(RESULT)]
    if process.returncode or not results:
        tail = "\n".join(lines[-40:])
        sys.exit(f"{label} failed (exit {process.returncode}), see {log_path}:\n{tail}")
    child = Child(json.loads(results[-1][len(RESULT) :]), usage.ru_maxrss / 1024, seconds, lines)
    print(f"  {label}: {seconds:.0f} s, peak RSS {child.peak_mib / 1024:.2f} GiB", flush=True)
    return child


def prepare_dataset(work: Path, count: int, resolution: int) -> Path:
    """Generated images, resized, with captions: the project's prepare stages, as in
    tests/test_train.py."""
    from loramill.captions.merge import merge_captions
    from loramill.demo.images import generate_dataset
    from loramill.files import write_jsonl
    from loramill.prepare.resize import resize_dataset

    root = work / f"data-{count}-{resolution}"
    if (root / "captions.jsonl").exists():
        return root
    generate_dataset(root / "ds", "stripes", count)
    # Squares (every image costs resolution²); the generated pictures are small, so let them
    # be enlarged rather than quarantined as too small.
    settings = {"resolution": resolution, "enable_bucket": False, "min_side": 1}
    manifest = resize_dataset(
        root / "ds" / "images", root / "resized", settings, cache_dir=root / "resize-cache"
    )
    auto = [{"image": e["file"], "caption": e["file"][:-4]} for e in manifest["images"]]
    write_jsonl(root / "auto.jsonl", auto)
    merge_captions(root / "auto.jsonl", None, root / "captions.jsonl", root / "report.json", "zzt")
    return root


def train_spec(
    model: str, data: Path, run_dir: Path, cache_root: Path, **config: Any
) -> dict[str, Any]:
    args = {
        "resized_dir": str(data / "resized"),
        "captions_jsonl": str(data / "captions.jsonl"),
        "checkpoints_dir": str(run_dir / "checkpoints"),
        "logdir": str(run_dir / "tb"),
        "base_model": model,
        "config": {**BASE_CONFIG, **config},
        "trigger": "zzt",
        "cache_root": str(cache_root),
    }
    return {"kind": "train", "args": args}


def fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def measure_memory(model: str, work: Path, counts: tuple[int, ...], lr2: float) -> dict:
    """(a) and (c): one 2-step run per dataset size from an empty cache, then (c) a rerun of the
    smallest with another learning rate on the same cache."""
    out: dict[str, Any] = {}
    for count in counts:
        data = prepare_dataset(work, count, 512)
        cache = fresh(work / f"cache-{count}")
        run_dir = fresh(work / f"run-a{count}")
        spec = train_spec(model, data, run_dir, cache, max_train_steps=2, save_steps=2)
        child = run_child(spec, work, f"a-{count}-images")
        encode_s, encoded = child.result["encode"]["latents"]
        text_s, texts = child.result["encode"]["texts"]
        out[count] = {
            "peak_mib": child.peak_mib,
            "hwm_before_loop_mib": child.result["hwm_before_loop_mib"],
            "encode_s_per_image": encode_s / max(encoded, 1),
            "text_s_per_caption": text_s / max(texts, 1),
            "step_s": child.result["steps"],
            "wall_s": child.seconds,
            "latents_line": child.line("latents: "),
            "texts_line": child.line("text embeddings: "),
            "checkpoint": child.result["checkpoint"],
        }
    small = counts[0]
    data, cache = work / f"data-{small}-512", work / f"cache-{small}"
    run_dir = fresh(work / "run-c")
    spec = train_spec(
        model, data, run_dir, cache, max_train_steps=2, save_steps=2, learning_rate=lr2
    )
    child = run_child(spec, work, "c-other-lr")
    first = Path(out[small]["checkpoint"]).read_bytes()
    out["reuse"] = {
        "first": out[small]["latents_line"],
        "second": child.line("latents: "),
        "second_texts": child.line("text embeddings: "),
        "adapters_differ": Path(child.result["checkpoint"]).read_bytes() != first,
    }
    return out


def step_specs(args: argparse.Namespace, data: Path, cache: Path) -> dict[str, dict]:
    steps = args.warm + args.timed
    common = {"max_train_steps": steps, "save_steps": steps}
    work = args.workdir
    specs = {
        "ours": train_spec(args.model, data, work / "run-b-ours", cache, **common),
        "baseline": {
            "kind": "baseline",
            "model": args.model,
            "dataset": str(data),
            "rank": 4,
            "seed": 42,
            "threads": 2,
            "steps": steps,
        },
    }
    if args.bf16:
        bf16 = {**common, "mixed_precision": "bf16"}
        specs["ours bf16"] = train_spec(args.model, data, work / "run-b-bf16", cache, **bf16)
    return specs


def measure_steps(args: argparse.Namespace) -> dict[str, dict]:
    """(b): interleaved rounds, warm-up steps dropped, medians over all timed steps."""
    work = args.workdir
    data = prepare_dataset(work, args.step_images, 256)
    cache = work / "cache-steps"
    # One short run fills the latent and text caches, so no timed run encodes anything.
    run_dir = fresh(work / "run-b-prime")
    prime = train_spec(args.model, data, run_dir, cache, max_train_steps=1, save_steps=1)
    run_child(prime, work, "b-prime-cache")
    specs = step_specs(args, data, cache)
    rounds: dict[str, list[float]] = {name: [] for name in specs}
    times: dict[str, list[float]] = {name: [] for name in specs}
    peaks: dict[str, list[float]] = {name: [] for name in specs}
    for repeat in range(1, args.repeats + 1):
        for name, spec in specs.items():
            if spec["kind"] == "train":
                fresh(Path(spec["args"]["checkpoints_dir"]).parent)
            label = f"b-r{repeat}-{name.replace(' ', '-')}"
            child = run_child(spec, work, label)
            if spec["kind"] == "train" and not child.line("latents: ").startswith("0 encoded"):
                sys.exit(f"{label} encoded latents: the cache was not warm")
            timed = child.result["steps"][args.warm :]
            times[name] += timed
            rounds[name].append(statistics.median(timed))
            peaks[name].append(child.peak_mib)
            print(f"    median {rounds[name][-1]:.2f} s/step", flush=True)
    return {
        name: {"median_s": statistics.median(times[name]), "peak_mib": max(peaks[name])}
        | {"round_s": rounds[name], "all_s": times[name], "peaks_mib": peaks[name]}
        for name in specs
    }


def round_ratio(steps: dict, name: str) -> float:
    """Median over rounds of baseline / ``name`` within the round: the other engineer's load
    comes and goes over minutes, and both sides of one round see about the same load."""
    pairs = zip(steps["baseline"]["round_s"], steps[name]["round_s"], strict=True)
    return statistics.median(base / side for base, side in pairs)


def source_fingerprint() -> dict[str, str]:
    """Which code was measured: HEAD plus a hash of src/loramill as it is on disk (the working
    tree may hold uncommitted changes)."""
    head = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    digest = hashlib.sha256()
    for path in sorted((REPO / "src" / "loramill").glob("*.py")):
        digest.update(path.name.encode() + path.read_bytes())
    return {"head": head, "src_sha256": digest.hexdigest()[:12]}


def report_memory(memory: dict) -> bool:
    counts = sorted(k for k in memory if isinstance(k, int))
    print("\n(a) memory: 512 px, batch 1, rank 4, 2 steps, empty latent cache")
    print(
        f"{'images':>6}{'peak RSS':>10}{'before loop':>13}{'encode/img':>12}"
        f"{'text/capt':>11}{'s/step':>8}{'wall':>7}"
    )
    for count in counts:
        m = memory[count]
        print(
            f"{count:>6}{m['peak_mib'] / 1024:>8.2f}Gi{m['hwm_before_loop_mib'] / 1024:>11.2f}Gi"
            f"{m['encode_s_per_image']:>11.2f}s{m['text_s_per_caption']:>10.2f}s"
            f"{statistics.mean(m['step_s']):>7.1f}s{m['wall_s']:>6.0f}s"
        )
    ratio = memory[counts[-1]]["peak_mib"] / memory[counts[0]]["peak_mib"]
    met = ratio <= MEMORY_TARGET
    print(
        f"peak {counts[-1]}/{counts[0]} images: {ratio:.3f} "
        f"(target ≤ {MEMORY_TARGET}): {'met' if met else 'MISSED'}"
    )
    reuse = memory["reuse"]
    print("\n(c) second training of the same images, another learning rate, same cache")
    print(f"  first run:  latents: {reuse['first']}")
    print(f"  second run: latents: {reuse['second']}; text embeddings: {reuse['second_texts']}")
    ok = reuse["second"].startswith("0 encoded") and reuse["adapters_differ"]
    print(f"  adapters differ: {reuse['adapters_differ']}: {'met' if ok else 'MISSED'}")
    return met and ok


def report_steps(steps: dict, args: argparse.Namespace) -> bool:
    ours, base = steps["ours"], steps["baseline"]
    print(
        f"\n(b) steps: 256 px, batch 1, UNet LoRA rank 4, warm cache; {args.timed} timed steps "
        f"after {args.warm} warm-up steps, {args.repeats} interleaved rounds"
    )
    print(f"{'side':<20}{'median s/step':>14}{'per round':>24}{'peak RSS':>10}")
    labels = {"ours": "ours fp32", "baseline": "baseline fp32", "ours bf16": "ours bf16 mixed"}
    for name, m in steps.items():
        per_round = " ".join(f"{x:.2f}" for x in m["round_s"])
        print(
            f"{labels[name]:<20}{m['median_s']:>14.2f}{per_round:>24}{m['peak_mib'] / 1024:>8.2f}Gi"
        )
    ratio, pooled = round_ratio(steps, "ours"), base["median_s"] / ours["median_s"]
    fast, lean = ratio >= SPEED_TARGET, ours["peak_mib"] <= base["peak_mib"]
    print(
        f"baseline / ours, both fp32: {ratio:.2f} median of per-round ratios, {pooled:.2f} "
        f"of pooled medians (target ≥ {SPEED_TARGET} on the first): {'met' if fast else 'MISSED'}"
    )
    print(f"peak RSS ours ≤ baseline: {'met' if lean else 'MISSED'}")
    if "ours bf16" in steps:
        bf16 = round_ratio(steps, "ours bf16")
        print(f"baseline fp32 / ours bf16 (a different precision, no target): {bf16:.2f}")
    return fast and lean


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/sd15", help="bench/build_sd15.py's output")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/lm-bench"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warm", type=int, default=2, help="untimed steps per (b) run")
    parser.add_argument("--timed", type=int, default=8, help="timed steps per (b) run")
    parser.add_argument("--images", type=int, nargs=2, default=(8, 64), help="(a) sizes")
    parser.add_argument("--step-images", type=int, default=8, help="(b) dataset size")
    parser.add_argument("--other-lr", type=float, default=2e-4, help="(c) learning rate")
    parser.add_argument("--bf16", action="store_true", help="(b) also ours in bf16")
    parser.add_argument("--skip-memory", action="store_true", help="skip (a) and (c)")
    parser.add_argument("--skip-steps", action="store_true", help="skip (b)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(json.loads(args.child))
        return 0
    args.workdir.mkdir(parents=True, exist_ok=True)
    args.workdir = args.workdir.resolve()
    results: dict[str, Any] = {"source": source_fingerprint(), "args": vars(args)}
    print(f"model {args.model}, workdir {args.workdir}, code {results['source']}", flush=True)
    run_child({"kind": "hash", "model": args.model}, args.workdir, "hash-model")
    ok, saved = True, args.workdir / "results.json"
    # Each part is reported and saved as soon as it is measured: a later failure keeps it.
    if not args.skip_memory:
        results["memory"] = measure_memory(
            args.model, args.workdir, tuple(args.images), args.other_lr
        )
        ok &= report_memory(results["memory"])
        saved.write_text(json.dumps(results, indent=2, default=str))
    if not args.skip_steps:
        results["steps"] = measure_steps(args)
        ok &= report_steps(results["steps"], args)
        saved.write_text(json.dumps(results, indent=2, default=str))
    if source_fingerprint() != results["source"]:
        # Figures from two versions of the code would be mixed: say so rather than report them.
        print(f"src/loramill changed during the run (now {source_fingerprint()}): rerun")
        ok = False
    print(f"\n{'all targets met' if ok else 'a target was MISSED'}; figures in {saved}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
