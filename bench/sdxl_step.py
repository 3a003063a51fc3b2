"""A LoRA training step of the full-size SDXL UNet with random weights: its time and peak memory.

The UNet of Stable Diffusion XL base 1.0 (``loramill.demo.full_size.SDXL``, 2.57 G parameters)
built in this process with random weights in bf16, the frozen base as ``mixed_precision: bf16``
keeps it; kohya's 722 UNet modules (``network_target: kohya``, loramill's network code) with fp32
LoRA layers of rank 4; bf16 autocast, gradient checkpointing unless switched off, AdamW. The
inputs are random: latents at the chosen resolution, 77 × 2048 text states and SDXL's added
conditions (a pooled 1280-wide embedding and six time ids). This is the step of diffusers' SDXL
LoRA example, not loramill's train stage: it says what memory such
a step needs on this machine, and is the baseline loramill's SDXL train stage is measured against.

    .venv/bin/python bench/sdxl_step.py [--resolution 1024] [--steps 2] [--no-checkpointing]

Each size is best measured in its own process: peak RSS is the process's.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch


def rss_gib() -> float:
    """The process's peak resident memory so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build_unet(checkpointing: bool) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import cast_training_params

    from loramill.demo.full_size import SDXL
    from loramill.models.network import NetworkSpec, add_lora

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: 5 GiB of weights, not 10
    try:
        unet = UNet2DConditionModel(**SDXL["unet"])
    finally:
        torch.set_default_dtype(torch.float32)
    add_lora({"unet": unet}, NetworkSpec("kohya", rank=4, alpha=4.0))
    cast_training_params(unet, dtype=torch.float32)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    return unet.train()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    unet = build_unet(args.checkpointing)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    print(
        f"built in {time.perf_counter() - start:.0f} s: "
        f"{sum(p.numel() for p in unet.parameters()) / 1e9:.3f} G parameters, "
        f"{sum(p.numel() for p in trainable) / 1e6:.2f} M trained, peak RSS {rss_gib():.2f} GiB",
        flush=True,
    )
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    side = args.resolution // 8
    generator = torch.Generator().manual_seed(0)
    size = float(args.resolution)
    conditions = {
        "text_embeds": torch.randn(1, 1280, generator=generator),
        "time_ids": torch.tensor([[size, size, 0.0, 0.0, size, size]]),
    }
    for step in range(args.steps):
        latents = torch.randn(1, 4, side, side, generator=generator)
        states = torch.randn(1, 77, 2048, generator=generator)
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = unet(latents, torch.tensor([500]), states, added_cond_kwargs=conditions).sample
        torch.nn.functional.mse_loss(pred.float(), torch.randn_like(latents)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(
            f"step {step} at {args.resolution} px "
            f"(checkpointing {'on' if args.checkpointing else 'off'}): "
            f"{time.perf_counter() - start:.1f} s, peak RSS {rss_gib():.2f} GiB",
            flush=True,
        )


if __name__ == "__main__":
    main()
