"""Sample images during training (``train.sample_every_n_steps``): a look at the adapter as it
trains, in the folder beside the checkpoints and in TensorBoard.

Prompts use kohya's inline options, so a prompt file from sd-scripts works line for line:
``a zzt cat --n blurry --w 512 --h 512 --d 7 --l 7.5 --s 28`` (negative prompt, width, height,
seed, guidance scale, steps). A prompt without ``--d`` gets ``seed + its index``: every sample
is rendered with the same seed every time, so samples of two steps differ only by training.

Rendering uses its own generator and the models in eval mode (no LoRA dropout), so a run with
samples trains exactly the adapter a run without them trains.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from loramill import LoramillError
from loramill.devices import on_device
from loramill.files import write_bytes
from loramill.models.checkpoint import step_name

OPTION = re.compile(r"\s--([a-z]+)\s+")
# kohya's option letter -> (field, type)
OPTIONS = {
    "n": ("negative", str),
    "w": ("width", int),
    "h": ("height", int),
    "d": ("seed", int),
    "l": ("guidance_scale", float),
    "s": ("steps", int),
}


@dataclass(frozen=True)
class SamplePrompt:
    prompt: str
    negative: str
    width: int
    height: int
    seed: int
    guidance_scale: float
    steps: int


def parse_sample_prompt(line: str, default: SamplePrompt) -> SamplePrompt:
    """A prompt with kohya's ``--x value`` options on top of ``default``."""
    parts = OPTION.split(" " + line.strip())
    fields = {"prompt": parts[0].strip()}
    for letter, value in zip(parts[1::2], parts[2::2], strict=True):
        if letter not in OPTIONS:
            known = ", ".join(f"--{k}" for k in OPTIONS)
            raise LoramillError(
                f"train.sample_prompts '{line}': unknown option --{letter} ({known})"
            )
        name, kind = OPTIONS[letter]
        try:
            fields[name] = kind(value.strip())
        except ValueError:
            raise LoramillError(
                f"train.sample_prompts '{line}': --{letter} needs a {kind.__name__}, "
                f"not '{value.strip()}'"
            ) from None
    sample = replace(default, **fields)
    if sample.width % 8 or sample.height % 8:
        raise LoramillError(f"train.sample_prompts '{line}': --w and --h must be multiples of 8")
    return sample


def sample_prompts(
    cfg: Any, trigger: str, resolution: int, guidance: float = 7.5
) -> list[SamplePrompt]:
    """The configured sample prompts, ``{trigger}`` filled in, each with its settings
    (``guidance``: the family's guidance scale, where a prompt does not give one)."""
    samples = []
    for index, line in enumerate(cfg.sample_prompts):
        default = SamplePrompt(
            prompt="",
            negative="",
            width=resolution,
            height=resolution,
            seed=cfg.seed + index,
            guidance_scale=guidance,
            steps=cfg.sample_steps,
        )
        samples.append(parse_sample_prompt(line.replace("{trigger}", trigger), default))
    return samples


def sample_name(step: int, index: int) -> str:
    return step_name(step, f"-{index:02d}.png")


class SampleRenderer:
    """Renders the sample prompts with the models being trained."""

    def __init__(self, cfg: Any, pipe: Any, prompts: list[SamplePrompt]) -> None:
        from loramill.models.base_model import pipeline_family

        self.cfg, self.prompts, self.family = cfg, prompts, pipeline_family(pipe)
        self.how = self.family.conditioning(cfg)
        # the base pipeline's parts; the trained models replace theirs when rendering
        names = ("vae", self.family.denoiser, *self.family.tokenizers, *self.family.text_encoders)
        self.parts = {name: getattr(pipe, name) for name in names}
        self.scheduler = self.family.sampler(cfg.sample_sampler, pipe.scheduler)

    def due(self, step: int) -> bool:
        every = self.cfg.sample_every_n_steps
        return bool(every) and step % every == 0

    def render(self, trained: dict[str, Any], accelerator: Any) -> list[Any]:
        """One image per prompt (PIL), with the adapter as it is now (``trained``: the
        models being trained, by component name)."""
        parts = {**self.parts, **trained}
        pipe = self.family.assemble({**parts, "scheduler": self.scheduler})
        pipe.set_progress_bar_config(disable=True)
        frozen = [part for name, part in self.parts.items()  # the VAE, frozen text encoders
                  if name not in trained and isinstance(part, torch.nn.Module)]  # fmt: skip
        for model in trained.values():
            model.eval()
        images = []
        try:
            with on_device(frozen, accelerator.device), torch.no_grad(), accelerator.autocast():
                for sample in self.prompts:
                    prompts = ([sample.prompt], [sample.negative])
                    size = (sample.height, sample.width)
                    args = self.family.prompt_arguments(pipe, *prompts, self.how, size)
                    images += pipe(
                        **args,
                        height=size[0],
                        width=size[1],
                        num_inference_steps=sample.steps,
                        guidance_scale=sample.guidance_scale,
                        generator=torch.Generator().manual_seed(sample.seed),
                    ).images
        finally:
            for model in trained.values():
                model.train()
        return images


def save_samples(images: list[Any], step: int, folders: list[Path], accelerator: Any) -> None:
    """PNGs in every folder (the checkpoints' samples/, the run state's), and TensorBoard."""
    import io

    import numpy as np

    for index, image in enumerate(images):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        for folder in folders:
            write_bytes(folder / sample_name(step, index), buffer.getvalue())
    tracker = accelerator.get_tracker("tensorboard", unwrap=False)
    for index, image in enumerate(images):
        pixels = np.asarray(image)[None]
        tracker.log_images({f"samples/{index:02d}": pixels}, step, dataformats="NHWC")
