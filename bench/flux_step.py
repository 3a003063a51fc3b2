"""A Flux LoRA training step at full width, reduced depth: its time and memory per block, and
against the step of diffusers' Flux LoRA recipe.

FLUX.1 [dev]'s transformer (``loramill.demo.full_size.FLUX_DEV``: 3072 wide, 24 heads, T5's 4096-
wide states, CLIP's 768-wide pooled output, guidance embedding) with ``--double`` double-stream
and ``--single`` single-stream blocks instead of 19 and 38, random weights built in bf16 in this
process. Every block kind appears, so per-block figures extrapolate: 19 double + 38 single is 19
groups of one double and two single blocks, so the full model's step is the (1, 2) run plus 18
times the difference between the (2, 4) run and it.

``loramill``: loramill's pieces of a Flux step — kohya's targets (loramill.models.flux.layout,
every Linear of the blocks), the flow-matching draw (loramill.train.flow_matching, kohya's
default ``sigma`` sampling, shift 3, ``raw`` prediction), the transformer's inputs
(loramill.models.flux.family) — on cached latents and text states, bf16 autocast, fp32 LoRA
layers, AdamW, gradient checkpointing; ``--fp8`` stores the frozen Linear weights in float8
(loramill.models.float8), ``--quantize int8|nf4`` by bitsandbytes (loramill.models.quantize,
after the LoRA layers, as the train step does). ``recipe``: diffusers'
``train_dreambooth_lora_flux.py`` step — the VAE (full-size FLUX.1 autoencoder, random weights)
encodes the batch every step, LoRA on its default targets (attention and feed-forward
projections), the same sigmas, prompt embeddings precomputed as that script does for one
instance prompt. Both run interleaved in one process.

    .venv/bin/python bench/flux_step.py --double 2 --single 4 [--fp8 | --quantize nf4]
        [--recipe] [--rounds 2]

Each configuration is best measured in its own process: peak RSS is the process's. The build
itself peaks at the bf16 model; the training peak (the kernel's VmHWM, reset once the models
are built) is what the steps hold: the stored weights, the LoRA with its optimizer state, and
the activations.
"""

from __future__ import annotations

import argparse
import resource
import time
from pathlib import Path

import torch

RANK = 16
RECIPE_TARGETS = ("attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj",
                  "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj",
                  "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")  # fmt: skip


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from now


def training_peak_gib() -> float:
    status = Path("/proc/self/status").read_text().splitlines()
    return next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) / 2**20


def build(
    double: int, single: int, targets: list[str] | tuple[str, ...], fp8: bool, quantize: str | None
) -> tuple:
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    from loramill.demo.full_size import FLUX_DEV
    from loramill.models.float8 import store_float8

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = FluxTransformer2DModel(**{**FLUX_DEV, "num_layers": double,
                                          "num_single_layers": single})  # fmt: skip
    finally:
        torch.set_default_dtype(torch.float32)
    model.requires_grad_(False)
    block_bytes = {
        kind: sum(p.numel() * p.element_size() for p in getattr(model, kind)[0].parameters())
        for kind in ("transformer_blocks", "single_transformer_blocks")
    }
    if fp8:
        store_float8(model)
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(targets)))
    if quantize:
        from loramill.models.quantize import quantize_linears

        quantize_linears(model, quantize, torch.bfloat16)
        model.to("cpu")  # quantizes
    lora = [p for p in model.parameters() if p.requires_grad]
    for parameter in lora:
        parameter.data = parameter.data.float()
    model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(lora, lr=1e-4)
    return model.train(), optimizer, block_bytes, sum(p.numel() for p in lora)


def step(model, optimizer, latents, text, sigma) -> None:
    from loramill.models.flux.family import Flux
    from loramill.models.flux.latents import unpack
    from loramill.train.flow_matching import FlowMatching, as_prediction, noisy_latents, velocity

    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(1))
    noisy = noisy_latents(latents, noise, sigma)
    inputs = Flux("flux").denoiser_inputs(text, noisy, sigma, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(**inputs).sample
    output = unpack(output.float(), *latents.shape[-2:])
    prediction = as_prediction(FlowMatching(), output, noisy, sigma)
    loss = torch.nn.functional.mse_loss(prediction, velocity(latents, noise))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    from loramill.models.flux.layout import peft_targets
    from loramill.train.flow_matching import FlowMatching, sample_sigmas

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--fp8", action="store_true")
    parser.add_argument("--quantize", choices=("int8", "nf4"))
    parser.add_argument("--recipe", action="store_true", help="also the recipe's step, interleaved")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per round, after one")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = {"num_layers": args.double, "num_single_layers": args.single}
    side = args.resolution // 8
    rng = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 16, side, side, generator=rng)
    text = {"hidden": torch.randn(1, 512, 4096, generator=rng),
            "pooled": torch.randn(1, 768, generator=rng)}  # fmt: skip
    tokens = (side // 2) ** 2
    runs = {
        "loramill": build(args.double, args.single, peft_targets(config), args.fp8, args.quantize)
    }
    print(f"built loramill: {runs['loramill'][3]:,} LoRA parameters; block weights (bytes, bf16) "
          f"{runs['loramill'][2]}; peak RSS {rss_gib():.2f} GiB", flush=True)  # fmt: skip
    if args.recipe:
        from diffusers import AutoencoderKL

        from loramill.demo.full_size import FLUX_VAE

        vae = AutoencoderKL(**FLUX_VAE).to(torch.bfloat16).requires_grad_(False)
        pixels = torch.rand(1, 3, args.resolution, args.resolution, generator=rng) * 2 - 1
        # its suffixes also catch the single blocks' q, k and v projections
        recipe = [f"transformer_blocks.{i}.{t}" for i in range(args.double) for t in RECIPE_TARGETS]
        recipe += [f"single_transformer_blocks.{i}.attn.to_{x}"
                   for i in range(args.single) for x in "qkv"]  # fmt: skip
        runs["recipe"] = build(args.double, args.single, recipe, args.fp8, args.quantize)
    how = FlowMatching()
    reset_peak()
    for round_ in range(args.rounds):
        for name, (model, optimizer, _, _) in runs.items():
            times = []
            for index in range(args.steps + 1):
                start = time.perf_counter()
                sigma = sample_sigmas(how, 1, tokens, rng)
                batch = latents
                if name == "recipe":  # the recipe encodes its batch every step
                    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                        dist = vae.encode(pixels.to(torch.bfloat16)).latent_dist
                    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
                    batch = (dist.sample().float() - shift) * scale
                step(model, optimizer, batch, text, sigma)
                if index:
                    times.append(time.perf_counter() - start)
            print(f"round {round_ + 1} {name}: s/step {' '.join(f'{t:.1f}' for t in times)}; "
                  f"peak RSS {rss_gib():.2f} GiB, training peak {training_peak_gib():.2f} GiB",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
