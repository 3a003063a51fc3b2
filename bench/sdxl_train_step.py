"""loramill's SDXL train step against diffusers' SDXL LoRA example, on the full-size SDXL
architecture with random weights: seconds per step, rounds interleaved in one process, and
the train stage's peak memory.

    .venv/bin/python bench/sdxl_train_step.py build /tmp/sdxl-full       # once: 7 GB in bf16
    .venv/bin/python bench/sdxl_train_step.py compare /tmp/sdxl-full [--resolution 512]
    .venv/bin/python bench/sdxl_train_step.py memory /tmp/sdxl-full [--resolution 1024]
    .venv/bin/python bench/sdxl_train_step.py export /tmp/sdxl-full --checkpoints DIR

``compare``: loramill's ``Training.step`` (the train stage's own step, its models loaded by
the stage's own ``prepare``: latents and both encoders' outputs cached, kohya's 722 UNet
modules or the attention projections) against the step of diffusers'
``examples/text_to_image/train_text_to_image_lora_sdxl.py``: the VAE in float32 encodes the
batch, both text encoders (bf16) encode its captions, the UNet (bf16, LoRA on to_q/k/v/out at
rank 4, float32) predicts the noise under bf16 autocast, AdamW. Both: batch 1, bf16, gradient
checkpointing, 2 threads. ``memory``: one process that trains 2 steps through ``train_lora``,
as the stage does; its peak RSS (loading included). ``export``: the export job's own
``export_and_verify`` on those checkpoints (every file checked against the full-size model in
diffusers, ComfyUI's, AUTOMATIC1111's and kohya's rules, strength 0 = base); its time and
peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

CAPTION = "a photo of red and white stripes"


def rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def build(folder: Path) -> None:
    """The SDXL base 1.0 layout with random weights, saved in bf16 (a few minutes)."""
    from loramill.demo.full_size import SDXL
    from loramill.demo.tiny_sdxl import sdxl_pipeline

    torch.set_default_dtype(torch.bfloat16)
    try:
        sdxl_pipeline(SDXL, seed=0).save_pretrained(folder, safe_serialization=True)
    finally:
        torch.set_default_dtype(torch.float32)


def dataset(root: Path, resolution: int) -> tuple[Path, Path]:
    """Four stripe images resized to ``resolution`` squares, one caption each."""
    from loramill.demo.images import generate_dataset
    from loramill.files import write_jsonl
    from loramill.prepare.resize import resize_dataset

    generate_dataset(root / "ds", "stripes", 4)
    settings = {"resolution": resolution, "enable_bucket": False, "min_side": 8}
    manifest = resize_dataset(root / "ds" / "images", root / "resized", settings, cache_dir=root)
    records = [{"image": e["file"], "caption": CAPTION} for e in manifest["images"]]
    write_jsonl(root / "captions.jsonl", records)
    return root / "resized", root / "captions.jsonl"


TRAIN = {"mixed_precision": "bf16", "gradient_checkpointing": True, "train_batch_size": 1,
         "rank": 4, "alpha": 4, "learning_rate": 1e-4, "seed": 0, "threads": 2}  # fmt: skip


def loramill_training(model: Path, root: Path, data: tuple[Path, Path], target: str) -> Any:
    """The train stage's Training, prepared by the stage's own code."""
    from loramill.hashing import HashCache
    from loramill.train.config import TrainConfig
    from loramill.train.data import read_examples
    from loramill.train.loop import prepare
    from loramill.train.step import make_accelerator

    cfg = TrainConfig.from_dict({**TRAIN, "network_target": target})
    accelerator = make_accelerator(cfg, "cpu", root / f"tb-{target}")
    examples = read_examples(*data)
    source = (str(model), "", False, "bench", "auto")
    hashes = HashCache(root / "hashes.sqlite")
    return prepare(cfg, accelerator, examples, source, root / "cache", hashes)[0]


class DiffusersRecipe:
    """The training step of diffusers' SDXL LoRA example (see the module's docstring)."""

    def __init__(self, model: Path, resolution: int) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        half = torch.bfloat16
        load = lambda cls, sub, dtype: cls.from_pretrained(model, subfolder=sub, dtype=dtype)  # noqa: E731
        self.unet = load(UNet2DConditionModel, "unet", half)
        self.vae = load(AutoencoderKL, "vae", torch.float32)  # the example's fp32 VAE
        self.encoders = [load(CLIPTextModel, "text_encoder", half),
                         load(CLIPTextModelWithProjection, "text_encoder_2", half)]  # fmt: skip
        self.tokenizers = [CLIPTokenizer.from_pretrained(model, subfolder=s)
                           for s in ("tokenizer", "tokenizer_2")]  # fmt: skip
        for part in (self.unet, self.vae, *self.encoders):
            part.requires_grad_(False)
        targets = ["to_k", "to_q", "to_v", "to_out.0"]
        config = LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
        self.unet.add_adapter(config)
        cast_training_params(self.unet, dtype=torch.float32)
        self.unet.enable_gradient_checkpointing()
        self.unet.train()
        self.params = [p for p in self.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)
        self.noise = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
        self.pixels = torch.rand(1, 3, resolution, resolution) * 2 - 1
        self.time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]])

    def _prompt(self) -> tuple[torch.Tensor, torch.Tensor]:
        states, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.encoders, strict=True):
            ids = tokenizer([CAPTION], padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids  # fmt: skip
            out = encoder(ids, output_hidden_states=True)
            pooled = out[0]  # the second encoder's is the one kept
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), pooled

    def step(self) -> float:
        latents = self.vae.encode(self.pixels).latent_dist.sample()
        latents = (latents * self.vae.config.scaling_factor).to(torch.bfloat16)
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.noise.config.num_train_timesteps, (1,))
        noisy = self.noise.add_noise(latents, noise, timesteps)
        states, pooled = self._prompt()
        added = {"text_embeds": pooled, "time_ids": self.time_ids}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = self.unet(noisy, timesteps, states, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()


def timed(step: Any, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def compare(model: Path, resolution: int, rounds: int, steps: int, target: str) -> None:
    torch.set_num_threads(TRAIN["threads"])
    root = Path(tempfile.mkdtemp(prefix="sdxl-bench-"))
    ours = loramill_training(model, root, dataset(root, resolution), target)
    print(f"loramill prepared (caches filled): peak RSS {rss_gib():.2f} GiB", flush=True)
    theirs = DiffusersRecipe(model, resolution)
    steppers = {"loramill": ours.step, "diffusers example": theirs.step}
    for step in steppers.values():
        step()  # warm-up: first-call allocations
    times: dict[str, list[float]] = {name: [] for name in steppers}
    for round_ in range(rounds):
        for name, step in steppers.items():
            times[name].append(timed(step, steps))
            print(f"round {round_ + 1} {name}: {times[name][-1]:.2f} s/step", flush=True)
    ours_s, theirs_s = (statistics.median(times[n]) for n in steppers)
    print(f"{resolution} px, network_target {target}: loramill {ours_s:.2f} s/step, diffusers "
          f"example {theirs_s:.2f} s/step: {theirs_s / ours_s:.2f}× its speed; "
          f"peak RSS {rss_gib():.2f} GiB")  # fmt: skip


def memory(model: Path, resolution: int) -> None:
    import logging

    from loramill.train.loop import train_lora

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    root = Path(tempfile.mkdtemp(prefix="sdxl-memory-"))
    data = dataset(root, resolution)
    config = {**TRAIN, "max_train_steps": 2, "save_steps": 2}
    start = time.perf_counter()
    train_lora(*data, root / "checkpoints", root / "tb", str(model), config,
               cache_root=root / "cache")  # fmt: skip
    print(f"{resolution} px: 2 steps through train_lora in {time.perf_counter() - start:.0f} s, "
          f"peak RSS {rss_gib():.2f} GiB; checkpoints in {root / 'checkpoints'}")  # fmt: skip


def export(model: Path, checkpoints: Path) -> None:
    from loramill.config import schema_defaults
    from loramill.export.verify import export_and_verify

    out = Path(tempfile.mkdtemp(prefix="sdxl-export-"))
    files = [out / name for name in ("b.safetensors", "b.diffusers.safetensors", "b.md")]
    start = time.perf_counter()
    export_and_verify(checkpoints, *files, out / "steps", "b", schema_defaults("export"),
                      str(model), False, TRAIN)  # fmt: skip
    print(
        f"exported and verified in {time.perf_counter() - start:.0f} s, "
        f"peak RSS {rss_gib():.2f} GiB: {', '.join(p.name for p in out.rglob('*.*'))}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("build", "compare", "memory", "export"))
    parser.add_argument("model", type=Path)
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="steps per round")
    parser.add_argument("--target", default="kohya", help="loramill's network_target")
    parser.add_argument("--checkpoints", type=Path, help="export: a memory run's checkpoints")
    args = parser.parse_args()
    if args.command == "build":
        build(args.model)
    elif args.command == "compare":
        compare(args.model, args.resolution or 512, args.rounds, args.steps, args.target)
    elif args.command == "memory":
        memory(args.model, args.resolution or 1024)
    else:
        export(args.model, args.checkpoints)


if __name__ == "__main__":
    main()
