"""kohya's ``blocks_to_swap`` at FLUX.1's full width: a swapping step trains the adapter a
plain one does, bit for bit, and what the swap costs a step on this CPU.

bench/flux_step.py's model and step (FLUX.1 [dev]'s transformer 3072 wide with ``--double`` +
``--single`` blocks, random bf16 weights, LoRA on kohya's targets, gradient checkpointing,
AdamW, 512 px), built twice: once as it is, once with the last blocks swapped by
loramill.models.block_swap as the train stage swaps them (host copies gathered per block; no
page lock on the CPU, where "host" and "device" are the same memory, so the time is the
copies' and the hooks', not PCIe's). The same draws go to both; after ``--steps`` steps every
LoRA tensor is compared.

    .venv/bin/python bench/block_swap.py --double 2 --single 4 --swap 1
"""

from __future__ import annotations

import argparse
import time

import torch
from flux_step import build, reset_peak, step, training_peak_gib


def run(args: argparse.Namespace, swap: int) -> tuple[dict[str, torch.Tensor], list[float], float]:
    """The LoRA tensors after the steps, the seconds of each step and the training peak."""
    from loramill.models.block_swap import swap_blocks
    from loramill.models.flux.layout import peft_targets
    from loramill.train.flow_matching import FlowMatching, sample_sigmas

    config = {"num_layers": args.double, "num_single_layers": args.single}
    model, optimizer, _, _ = build(args.double, args.single, peft_targets(config), False, None)
    if swap:
        swapped = swap_blocks(model, swap, torch.device("cpu"), torch.bfloat16)
        swapped.pin()
        print(f"swapping {len(swapped.frozen)} blocks", flush=True)
    rng = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, 64, 64, generator=rng)
    text = {"hidden": torch.randn(1, 512, 4096, generator=rng),
            "pooled": torch.randn(1, 768, generator=rng)}  # fmt: skip
    reset_peak()
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(model, optimizer, latents, text, sample_sigmas(FlowMatching(), 1, 32 * 32, rng))
        times.append(time.perf_counter() - start)
    lora = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    return lora, times, training_peak_gib()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--swap", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    for swap in (0, args.swap):
        lora, times, peak = run(args, swap)
        results[swap] = lora
        print(f"blocks_to_swap {swap}: s/step {' '.join(f'{t:.1f}' for t in times)}; "
              f"training peak {peak:.2f} GiB", flush=True)  # fmt: skip
    plain, swapped = results[0], results[args.swap]
    same = plain.keys() == swapped.keys() and all(torch.equal(plain[k], swapped[k]) for k in plain)
    print(f"{len(plain)} LoRA tensors after {args.steps} steps: "
          f"{'equal bit for bit' if same else 'DIFFERENT'}")  # fmt: skip


if __name__ == "__main__":
    main()
