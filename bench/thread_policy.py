"""Training beside other busy processes (issues #25 and #28): OpenMP's wait policy.

A LoRA training step (forward + backward + AdamW) on 2 threads, as a job runs it
(torch.set_num_threads(train.threads)): by default the embedded tiny model (models/tiny-sd:
the UNet with the default train config's network, fp32, batch 2, 16×16 latents); with
--model a real-size one (bench/build_sd15.py's SD1.5), --precision bf16 (frozen weights bf16,
LoRA fp32, autocast), --batch, --latent and --network (a network_target). Each wait policy of
--policies is measured with nothing started by this script ("quiet") and beside --busy Python
busy loops ("loaded"; multiprocessing, bounded in time):

  default    OMP_WAIT_POLICY unset: libgomp spins about 3 ms, then sleeps
  PASSIVE    OMP_WAIT_POLICY=PASSIVE: sleep at once (what jobs got before issue #28)
  spin 1e3   OMP_WAIT_POLICY unset, GOMP_SPINCOUNT=1000: a short spin, then sleep (what
             rules/setup.smk gives jobs now: loramill.openmp); 3e3, 1e4, 1e5 likewise

Each measurement is a fresh subprocess: libgomp reads OMP_WAIT_POLICY when torch loads. The
configurations are interleaved for --repeats rounds and each reported as the median over
rounds of its median ms/step, so load from other work that comes and goes spreads over all
of them. Printed: ms/step, the slowdown under load (loaded ÷ quiet) per policy, and each
policy ÷ PASSIVE per condition; the load average before each measurement says how quiet "quiet" was.

    .venv/bin/python bench/thread_policy.py [--repeats 3] [--steps 10] [--budget 60] [--busy 4]
    .venv/bin/python bench/thread_policy.py --model /tmp/sd15 --precision bf16 --batch 1 \
        --latent 32 --network kohya --policies PASSIVE "spin 1e3" [--repeats 1 --steps 6]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
MODEL = REPO / "models" / "tiny-sd"
RESULT = "RESULT "
THREADS = 2
# name -> what the child's environment gets (OMP_WAIT_POLICY and GOMP_SPINCOUNT unset first);
# the spin counts: libgomp spins that many times before sleeping (its default is 300000,
# throttled to 1000 when it sees more threads than CPUs)
POLICIES: dict[str, dict[str, str]] = {
    "default": {},
    "PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "spin 1e3": {"GOMP_SPINCOUNT": "1000"},  # loramill.openmp.SPIN_COUNT
    "spin 3e3": {"GOMP_SPINCOUNT": "3000"},
    "spin 1e4": {"GOMP_SPINCOUNT": "10000"},
    "spin 3e4": {"GOMP_SPINCOUNT": "30000"},
    "spin 1e5": {"GOMP_SPINCOUNT": "100000"},
}


# ---------------------------------------------------------------- child side (one process each)


def child(spec: dict[str, Any]) -> dict[str, Any]:
    """A warm-up step, then up to ``steps`` timed ones or ``budget`` seconds, at least 2."""
    import torch

    from loramill.models.base_model import load_pipeline
    from loramill.models.network import NetworkSpec, add_lora, keep_input_dtype
    from loramill.train.config import TrainConfig

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    half = spec["precision"] == "bf16"  # frozen weights bf16, LoRA fp32, autocast: as a job
    pipe = load_pipeline(spec["model"], "bfloat16" if half else "float32")
    unet, batch, size = pipe.unet, spec["batch"], spec["latent"]
    network = {"network_target": spec["network"]} if spec["network"] else {}
    add_lora({"unet": unet}, NetworkSpec.from_config(TrainConfig.from_dict(network)))
    params = [p for p in unet.parameters() if p.requires_grad]
    if half:
        for param in params:
            param.data = param.data.float()
        keep_input_dtype([unet])
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    width = unet.config.cross_attention_dim
    latents, noise = torch.randn(batch, 4, size, size), torch.randn(batch, 4, size, size)
    hidden = torch.randn(batch, pipe.tokenizer.model_max_length, width)

    def step() -> None:
        timesteps = torch.randint(0, 1000, (batch,))
        noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast("cpu", torch.bfloat16, enabled=half):
            pred = unet(noisy, timesteps, hidden).sample
        torch.nn.functional.mse_loss(pred.float(), noise).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the first call allocates and picks kernels
    times: list[float] = []
    started = time.perf_counter()
    steps, budget = spec["steps"], spec["budget"]
    while len(times) < steps and (len(times) < 2 or time.perf_counter() - started < budget):
        begin = time.perf_counter()
        step()
        times.append(time.perf_counter() - begin)
    return {
        "ms": [t * 1000 for t in times],
        "threads": torch.get_num_threads(),
        "openmp": "OpenMP" in torch.__config__.parallel_info(),
    }


# ---------------------------------------------------------------- parent side


def spin(deadline: float) -> None:
    """A busy process: pure Python, holds a core until ``deadline``."""
    count = 0
    while time.monotonic() < deadline:
        count += 1


class Busy:
    """``count`` busy processes for at most ``seconds``; terminated on exit either way."""

    def __init__(self, count: int, seconds: float) -> None:
        self.count, self.seconds = count, seconds
        self.processes: list[Any] = []

    def __enter__(self) -> Busy:
        deadline = time.monotonic() + self.seconds
        context = multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=spin, args=(deadline,)) for _ in range(self.count)]
        for process in self.processes:
            process.start()
        time.sleep(1.0)  # all of them spinning before the measurement starts
        return self

    def __exit__(self, *exc: Any) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.join(10)


def measure(policy: dict[str, str], args: argparse.Namespace) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "src")}
    for name in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS"):
        env.pop(name, None)  # OMP_NUM_THREADS: the job's own torch.set_num_threads decides
    env.update(policy)
    spec = {key: getattr(args, key) for key in ("steps", "budget", "precision", "batch", "latent")}
    spec |= {"model": str(args.model), "network": args.network}
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    load = os.getloadavg()[0]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"child failed ({done.returncode}):\n{done.stderr}")
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith(RESULT))
    result = json.loads(line[len(RESULT) :])
    return result | {"load": load, "median_ms": statistics.median(result["ms"])}


def report(
    medians: dict[tuple[str, str], float], loads: dict[tuple[str, str], list], policies: list[str]
) -> None:
    print(f"\n{'condition':<8} {'policy':<8} {'ms/step':>9}  load average before")
    for (condition, policy), ms in medians.items():
        shown = " ".join(f"{x:.1f}" for x in loads[condition, policy])
        print(f"{condition:<8} {policy:<8} {ms:>9.0f}  {shown}")
    print()
    for policy in policies:
        ratio = medians["loaded", policy] / medians["quiet", policy]
        print(f"slowdown under load, {policy:<8}: {ratio:6.1f}x")
    for condition in ("quiet", "loaded"):
        for policy in policies:
            ratio = medians[condition, policy] / medians[condition, "PASSIVE"]
            print(f"{policy} / PASSIVE, {condition:<7}: {ratio:6.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--budget", type=float, default=60, help="seconds of timed steps, at most")
    parser.add_argument("--busy", type=int, default=4, help="busy processes for 'loaded'")
    parser.add_argument("--model", type=Path, default=MODEL, help="e.g. bench/build_sd15.py's")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--latent", type=int, default=16, help="latent side (pixels / 8)")
    parser.add_argument("--network", default="", help="network_target (default: the config's)")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    args = parser.parse_args()
    # Killed (timeout, Slurm): unwind, so the busy processes and the child are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))
    print(f"{os.cpu_count()} CPUs; {THREADS} threads; {args.busy} busy processes when loaded")
    runs: dict[tuple[str, str], list[dict]] = {
        (c, p): [] for c in ("quiet", "loaded") for p in args.policies
    }
    for repeat in range(1, args.repeats + 1):
        for condition, policy in runs:
            # The busy loops outlive any child that keeps to its budget (model load included).
            with Busy(args.busy if condition == "loaded" else 0, args.budget + 300):
                result = measure(POLICIES[policy], args)
            runs[condition, policy].append(result)
            print(
                f"round {repeat} {condition:<6} {policy:<8} {result['median_ms']:8.0f} ms/step "
                f"({len(result['ms'])} steps, load {result['load']:.1f}, "
                f"{result['threads']} threads, OpenMP: {result['openmp']})",
                flush=True,
            )
    medians = {key: statistics.median(r["median_ms"] for r in rs) for key, rs in runs.items()}
    report(medians, {key: [r["load"] for r in rs] for key, rs in runs.items()}, args.policies)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(RESULT + json.dumps(child(json.loads(sys.argv[2]))), flush=True)
    else:
        main()
