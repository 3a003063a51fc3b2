"""One training step of SD1.5's UNet in NCHW against channels_last, interleaved (issue #28).

The step of bench/train_real_size.py without its data pipeline: the UNet (random weights,
bench/build_sd15.py) with peft LoRA rank 4 on attention, feed-forward and projections, latents
of a 256 px image, batch 1, forward, MSE loss, backward, AdamW, zero_grad. Each round times
both memory formats (model and input converted), one warm-up step then three timed, and prints
their median; the last lines are the per-round ratios NCHW ÷ channels_last.

    .venv/bin/python bench/memory_format.py /tmp/sd15 [--rounds 5] [--bf16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
FORMATS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="bench/build_sd15.py's output")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast around the forward")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(2)
    unet = UNet2DConditionModel.from_pretrained(f"{args.model}/unet")
    unet.requires_grad_(False)
    unet = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS), unet)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-4)
    latents, text = torch.randn(1, 4, 32, 32), torch.randn(1, 77, 768)  # 256 px, CLIP-L states
    timestep = torch.tensor([500])

    def step(memory_format: torch.memory_format) -> float:
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            out = unet(latents.contiguous(memory_format=memory_format), timestep, text).sample
        torch.nn.functional.mse_loss(out.float(), torch.zeros_like(out).float()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    seconds: dict[str, list[float]] = {name: [] for name in FORMATS}
    for index in range(args.rounds):
        for name, memory_format in FORMATS.items():
            unet.to(memory_format=memory_format)
            step(memory_format)  # warm-up: oneDNN picks and caches its kernels
            seconds[name].append(statistics.median(step(memory_format) for _ in range(3)))
            print(f"round {index} {name}: {seconds[name][-1]:.3f} s/step", flush=True)
    ratios = [a / b for a, b in zip(seconds["nchw"], seconds["channels_last"], strict=True)]
    print("NCHW ÷ channels_last per round:", " ".join(f"{r:.2f}" for r in ratios))
    print(f"median: {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
