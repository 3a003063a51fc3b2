"""Pretrain the embedded tiny Stable Diffusion 1.x pipeline (models/tiny-sd) on CPU.

    python models/pretrain_tiny_sd.py [OUT_DIR] [--vae-steps N] [--unet-steps N] [--images N]

The model must know something for a LoRA to visibly teach it something new. It learns a small
world of procedurally drawn, captioned pictures — "a red circle on a white background": four
colours, three shapes, two backgrounds — and nothing else: the stripes and bands the demo
datasets teach are unknown to its UNet and text encoder.

1. The VAE is trained as an autoencoder on these pictures and on busier scenes (several shapes,
   thick lines and hatching, mostly in the palette), so it can represent what LoRA datasets
   show, not only what the UNet was taught to draw.
2. The latents of the captioned pictures are encoded once; the UNet and the text encoder (real
   CLIP tokenizer) are trained together as a text-conditioned noise predictor, the SD1.x
   objective, with partial and 10 % empty captions (short prompts and classifier-free guidance)
   and offset noise.

What 28 minutes buy: rough coloured shapes on a pale, textured ground; shape and colour follow
the prompt loosely, the background hardly at all. Enough for a LoRA to visibly add stripes.

Deterministic: every draw is seeded and the thread count fixed, so a rerun with the same package
versions writes byte-identical files (a slow test checks the committed copy). Weights are saved
in float16 (about 9 MB). About 28 minutes on two cores of this project's CPUs.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from loramill.demo.images import BACKGROUNDS, COLOURS
from loramill.demo.tiny_models import TINY, sd_pipeline
from loramill.train.latents import to_pixels

RES = 64
SUPERSAMPLE = 4  # draw at 4× and downscale: anti-aliased edges, as in real photos
SHAPES = ("circle", "square", "triangle")
NOISE_OFFSET = 0.1
THREADS = 2  # float sums depend on the thread count: fixed, so the bytes are reproducible


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: list[float], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def captioned_picture(rnd: random.Random) -> tuple[Image.Image, str]:
    """One shape of one colour on a plain background, and its caption."""
    colour, shape, background = (
        rnd.choice(list(COLOURS)),
        rnd.choice(SHAPES),
        rnd.choice(list(BACKGROUNDS)),
    )
    size = RES * SUPERSAMPLE
    image = Image.new("RGB", (size, size), BACKGROUNDS[background])
    side = rnd.uniform(0.3, 0.6) * size
    x0, y0 = (rnd.uniform(0.05 * size, 0.95 * size - side) for _ in range(2))
    draw_shape(ImageDraw.Draw(image), shape, [x0, y0, x0 + side, y0 + side], COLOURS[colour])
    caption = f"a {colour} {shape} on a {background} background"
    return image.resize((RES, RES), Image.LANCZOS), caption


PALETTE = [*COLOURS.values(), *BACKGROUNDS.values()]


def random_colour(rnd: random.Random) -> tuple[int, int, int]:
    """Mostly the palette (what the model will be asked to draw), sometimes any colour."""
    if rnd.random() < 0.75:
        return rnd.choice(PALETTE)
    return tuple(rnd.randrange(256) for _ in range(3))


def busy_scene(rnd: random.Random) -> Image.Image:
    """Shapes, thick lines and hatching in random colours: autoencoder training data."""
    size = RES * SUPERSAMPLE
    image = Image.new("RGB", (size, size), random_colour(rnd))
    draw = ImageDraw.Draw(image)
    for _ in range(rnd.randint(1, 5)):
        kind = rnd.choice(("shape", "shape", "line", "hatching"))
        fill = random_colour(rnd)
        if kind == "shape":
            side = rnd.uniform(0.1, 0.7) * size
            x0, y0 = (rnd.uniform(-0.1 * size, size - 0.5 * side) for _ in range(2))
            draw_shape(draw, rnd.choice(SHAPES), [x0, y0, x0 + side, y0 + side], fill)
        elif kind == "line":
            points = [(rnd.uniform(0, size), rnd.uniform(0, size)) for _ in range(2)]
            draw.line(points, fill=fill, width=rnd.randint(8, 48))
        else:  # parallel bands at any angle and period
            period, angle = rnd.uniform(24, 96), rnd.uniform(0, math.pi)
            dx, dy = math.cos(angle), math.sin(angle)
            width = int(period * rnd.uniform(0.3, 0.7))
            for k in range(-int(2 * size / period), int(2 * size / period)):
                cx, cy = size / 2 + k * period * dy, size / 2 - k * period * dx
                ends = [
                    (cx - 2 * size * dx, cy - 2 * size * dy),
                    (cx + 2 * size * dx, cy + 2 * size * dy),
                ]
                draw.line(ends, fill=fill, width=width)
    return image.resize((RES, RES), Image.LANCZOS)


def train_vae(vae, steps: int, batch: int, count: int, seed: int) -> float:
    rnd, generator = random.Random(f"vae:{seed}"), torch.Generator().manual_seed(seed)
    pictures = [busy_scene(rnd) if i % 2 else captioned_picture(rnd)[0] for i in range(count)]
    pixels = to_pixels(pictures).contiguous()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    vae.train()
    mse = torch.tensor(float("nan"))
    for step in range(steps):
        x = pixels[torch.randint(0, count, (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        mse = F.mse_loss(vae.decode(z).sample, x)
        # A light KL term keeps the latents near N(0, 1) without blurring the reconstructions.
        loss = mse + 1e-3 * posterior.kl().mean() / x[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"vae step {step}: reconstruction mse {mse.item():.4f}", flush=True)
    vae.eval().requires_grad_(False)
    return mse.item()


def caption_variant(caption: str, rnd: random.Random) -> str:
    """Mostly the full caption, sometimes a part of it, so short prompts mean something too."""
    _, colour, shape, _, _, background, _ = caption.split()
    return rnd.choices(
        [
            caption,
            f"a {colour} {shape}",
            f"a {shape} on a {background} background",
            f"a {shape}",
            "",
        ],
        weights=[60, 12, 10, 8, 10],
    )[0]


def train_denoiser(pipe, steps: int, batch: int, count: int, seed: int) -> float:
    """UNet + text encoder as the SD1.x noise predictor on the captioned pictures' latents."""
    from diffusers import DDPMScheduler

    rnd, generator = random.Random(f"unet:{seed}"), torch.Generator().manual_seed(seed + 1)
    images, captions = zip(*(captioned_picture(rnd) for _ in range(count)), strict=True)
    vae, unet, text_encoder, tokenizer = pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer
    with torch.no_grad():
        pixels = to_pixels(images).contiguous()
        latents = torch.cat(
            [vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, count, 256)]
        )
    # Unit-variance latents, as SD1.5's 0.18215 makes them for its VAE.
    vae.register_to_config(scaling_factor=round(1.0 / latents.std().item(), 5))
    latents = latents * vae.config.scaling_factor
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas = noise_scheduler.alphas_cumprod
    params = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    warmup = 100
    unet.train(), text_encoder.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        cosine = 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = 1e-3 * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * cosine)
        index = torch.randint(0, count, (batch,), generator=generator)
        prompts = [caption_variant(captions[i], rnd) for i in index.tolist()]
        ids = tokenizer(
            prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        z0 = latents[index]
        t = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (batch,), generator=generator
        )
        noise = torch.randn(z0.shape, generator=generator)
        # Offset noise (as kohya's noise_offset): without it the noise never shifts a channel's
        # mean, and a model learns overall brightness poorly (SD1.5's grey "dark" images).
        noise += NOISE_OFFSET * torch.randn((*z0.shape[:2], 1, 1), generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z0 + (1 - a).sqrt() * noise
        predicted = unet(noisy, t, encoder_hidden_states=text_encoder(ids.input_ids)[0]).sample
        loss = F.mse_loss(predicted, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"unet step {step}: noise mse {loss.item():.4f}", flush=True)
    unet.eval(), text_encoder.eval()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", default=str(Path(__file__).parent / "tiny-sd"))
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--unet-steps", type=int, default=1700)
    parser.add_argument("--images", type=int, default=4096, help="pictures per phase")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    started = time.monotonic()
    pipe = sd_pipeline(TINY, seed=args.seed)
    vae_mse = train_vae(pipe.vae, args.vae_steps, 16, args.images, args.seed)
    print(f"vae: {time.monotonic() - started:.0f} s", flush=True)
    unet_mse = train_denoiser(pipe, args.unet_steps, 32, args.images, args.seed)
    # float16 on disk keeps the model small; loading upcasts to the configured dtype.
    pipe.to(torch.float16).save_pretrained(args.out, safe_serialization=True)
    print(
        f"wrote {args.out}: vae mse {vae_mse:.4f}, unet mse {unet_mse:.4f}, "
        f"{time.monotonic() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
