"""The validate stage: a validation loss for every checkpoint of a run (kohya's
``validation_split``, ``validation_seed`` and ``validate_every_n_steps``).

The images are those ``validation_split`` held out of training (loramill.train.data.split)
or a dataset's own ``data/<ds>/validation/`` folder, resized and captioned as training images
are. Each image gets one fixed draw, from ``validation_seed`` and its content: the latent
sample, the noise and the timestep (σ for Flux). Every checkpoint is measured on the same
draws with the training objective, so the numbers compare across checkpoints and runs, and an
image added changes no other image's draw.

A stage of its own, reading the checkpoints: adding a validation image measures them again
and trains nothing. Memory is one batch of the training's size, whatever the number of
images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from loramill import LoramillError
from loramill.files import atomic_path, write_text
from loramill.hashing import DEFAULT_DB, HashCache
from loramill.models.base_model import (
    base_family,
    load_pipeline,
    pipeline_family,
    text_parts,
    use_sdpa,
)
from loramill.models.checkpoint import (
    AVERAGE_PREFIX,
    STEP_KEY,
    SUFFIX,
    TRAIN_LOSS_KEY,
    list_checkpoints,
    load_network_state,
    read_checkpoint,
)
from loramill.train.config import TrainConfig
from loramill.train.data import Encoded, Examples, read_examples, split
from loramill.train.latents import CACHE_ROOT, load_batch
from loramill.train.masks import batch_masks, mask_paths
from loramill.train.ranking import best_checkpoint
from loramill.train.step import base_dtypes, make_objective, network_models

log = logging.getLogger(__name__)
RESULT_VERSION = 1


def validation_config(cfg: TrainConfig) -> TrainConfig:
    """The training config as validation reads it: captions as written (no shuffle or
    dropout), no mirror images, every latent from the cache, no gradients to save memory on."""
    return replace(
        cfg,
        flip_aug=False,
        shuffle_caption=False,
        caption_dropout_rate=0.0,
        caption_tag_dropout_rate=0.0,
        cache_latents=True,
        gradient_checkpointing=False,
        init_from="",
    )


def validation_examples(
    resized_dir: Path, captions_jsonl: Path, cfg: TrainConfig, folder: bool, hashes: HashCache
) -> Examples:
    """A validation folder's examples (``folder``), or those validation_split held out."""
    examples = read_examples(resized_dir, captions_jsonl)
    if not folder:
        if not cfg.validation_split:
            raise LoramillError(
                "validate: no validation images; set train.validation_split or add "
                "a validation/ folder to the dataset"
            )
        examples = split(examples, cfg.validation_split, hashes)[1]
    return examples


def image_seed(seed: int, image_hash: str) -> int:
    """The seed of one image's fixed draw: the validation seed and the image's content."""
    digest = hashlib.sha256(f"{seed}:{image_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1  # a non-negative int64


def validation_batches(examples: Examples, size: int) -> list[list[int]]:
    """Example indices in batches of ``size`` that share a bucket (one shape per call), in
    bucket order, then caption order."""
    batches = []
    for bucket in sorted(set(examples.buckets)):
        chosen = [i for i, b in enumerate(examples.buckets) if b == bucket]
        batches += [chosen[i : i + size] for i in range(0, len(chosen), size)]
    return batches


class Validation:
    """The base model with the run's network, the validation images' encodings and their
    fixed draws: the validation loss of one set of LoRA tensors at a time."""

    def __init__(
        self, cfg: TrainConfig, pipe: Any, examples: Examples, encoded: Encoded, seed: int,
        hashes: HashCache, device: Any,
    ) -> None:  # fmt: skip
        self.cfg, self.examples, self.encoded, self.device = cfg, examples, encoded, device
        self.family = pipeline_family(pipe)
        self.seeds = [image_seed(seed, hashes.file(path)) for path in examples.images]
        self.masks = mask_paths(cfg, examples.images, examples.entries)  # as training weighs
        self.objective = make_objective(cfg, self.family, pipe)
        self.models = network_models(cfg, self.family, pipe, device)
        for model in self.models.values():
            model.eval()
        self.tokenizers, encoders = text_parts(pipe)
        self.encoders = dict(zip(self.family.text_encoders, encoders, strict=True))
        self.autocast = torch.autocast(
            device.type, dtype=torch.bfloat16, enabled=cfg.mixed_precision == "bf16"
        )

    def _draws(self, batch: list[int]) -> Any:
        """Each image's fixed latent sample, noise and timestep, from its own generator."""
        dists = load_batch(self.encoded.latents, [self.encoded.latent_keys[i] for i in batch])
        rows = []
        for row, index in enumerate(batch):
            rng = torch.Generator().manual_seed(self.seeds[index])
            mean, std = dists["mean"][row : row + 1], dists["std"][row : row + 1]
            latents = mean + std * torch.randn(mean.shape, generator=rng)
            latents = (latents - self.encoded.shift) * self.encoded.scaling
            rows.append(self.objective.noised(latents, rng))
        return [torch.cat(parts) for parts in zip(*rows, strict=True)]

    def _conditioning(self, batch: list[int]) -> dict[str, torch.Tensor]:
        """The captions' conditioning: cached, or by the text encoders the run trained (with
        this checkpoint's LoRA) beside the frozen ones."""
        encoded = self.encoded
        if encoded.texts is not None:
            return load_batch(encoded.texts, [encoded.text_keys[i] for i in batch])
        names = self.family.text_encoders
        encoders = [self.models.get(n, self.encoders[n]).to(self.device) for n in names]
        texts = [self.examples.captions[i] for i in batch]
        how = self.family.conditioning(self.cfg)
        return self.family.encode(self.tokenizers, encoders, texts, how)

    @torch.no_grad()
    def losses(self, tensors: dict[str, torch.Tensor]) -> list[float]:
        """Each validation image's loss under the LoRA ``tensors``, in example order."""
        load_network_state(self.models, tensors)
        found: dict[int, float] = {}
        for batch in validation_batches(self.examples, self.cfg.train_batch_size):
            noisy, target, level = self._draws(batch)
            sizes = self.family.size_conditions([self.examples.entries[i] for i in batch])
            on_device = lambda t: t.to(self.device)  # noqa: E731
            with self.autocast:
                pred = self.objective.predict(
                    self.models[self.family.denoiser], on_device(noisy), on_device(level),
                    {k: on_device(v) for k, v in self._conditioning(batch).items()},
                    None if sizes is None else on_device(sizes),
                )  # fmt: skip
            masks = batch_masks([self.masks[i] for i in batch], [False] * len(batch),
                                noisy.shape[-2:])  # fmt: skip
            for row, index in enumerate(batch):
                one = slice(row, row + 1)
                mask = None if masks is None else on_device(masks[one])
                loss = self.objective.loss(pred[one], on_device(target[one]), level[one], mask)
                found[index] = loss.item()
        return [found[i] for i in range(len(self.examples.images))]


def validate_checkpoints(
    checkpoints_dir: str | os.PathLike,
    resized_dir: str | os.PathLike,
    captions_jsonl: str | os.PathLike,
    result_json: str | os.PathLike,
    plot_png: str | os.PathLike,
    logdir: str | os.PathLike,
    base_model: str,
    config: dict[str, Any],
    folder: str = "",
    allow_unsafe_weights: bool = False,
    device: str = "auto",
    family: str = "auto",
    cache_root: str | os.PathLike = CACHE_ROOT,
) -> dict[str, Any]:
    """The validate job: every checkpoint's (and moving average's) validation loss into
    ``result_json``, TensorBoard (``logdir``) and ``plot_png``; returns the result.
    ``folder``: the dataset's validation folder the images come from, else validation_split's.
    """
    from loramill.devices import resolve_device

    cfg = validation_config(TrainConfig.from_dict(config))
    torch.set_num_threads(cfg.threads)
    seed = cfg.seed if cfg.validation_seed is None else cfg.validation_seed
    hashes = HashCache(DEFAULT_DB)
    examples = validation_examples(
        Path(resized_dir), Path(captions_jsonl), cfg, bool(folder), hashes
    )
    torch_device = resolve_device(device)
    pipe = load_pipeline(base_model, base_dtypes(cfg, base_family(base_model, family)),
                         allow_unsafe_weights, family)  # fmt: skip
    use_sdpa(pipe, cfg.sdpa)
    encoded = Encoded(pipe, examples, cfg, base_model, torch_device, Path(cache_root), hashes)
    hashes.save()
    validation = Validation(cfg, pipe, examples, encoded, seed, hashes, torch_device)
    rows = [measure(validation, path) for path in list_checkpoints(checkpoints_dir)]
    by_step = {row["step"]: row for row in rows}
    for path in sorted(Path(checkpoints_dir).glob(AVERAGE_PREFIX + "*" + SUFFIX)):  # train.ema
        average = measure(validation, path)
        by_step[average["step"]]["ema_loss"] = average["loss"]
    source = f"{folder}" if folder else f"train.validation_split {cfg.validation_split:g}"
    result = {
        "version": RESULT_VERSION,
        "source": source,
        "seed": seed,
        "images": [path.name for path in examples.images],
        "checkpoints": rows,
        "best": best_checkpoint({"checkpoints": rows}),
    }
    write_text(result_json, json.dumps(result, indent=2) + "\n")
    log_to_tensorboard(rows, logdir)
    plot_validation(rows, plot_png)
    best = result["best"]
    log.info("validation: %d images (%s), %d checkpoints; the lowest loss %.6f at step %d",
             len(examples.images), source, len(rows), best["loss"], best["step"])  # fmt: skip
    return result


def measure(validation: Validation, path: Path) -> dict[str, Any]:
    """One checkpoint's row of the result: its step, file, mean validation loss, each
    image's and the training loss since the previous checkpoint."""
    checkpoint = read_checkpoint(path)
    losses = validation.losses(checkpoint.tensors)
    metadata = checkpoint.metadata
    train_loss = metadata.get(TRAIN_LOSS_KEY)
    return {
        "step": int(metadata[STEP_KEY]),
        "file": path.name,
        "loss": sum(losses) / len(losses),
        "image_losses": losses,
        "train_loss": None if train_loss is None else float(train_loss),
    }


def log_to_tensorboard(rows: list[dict[str, Any]], logdir: str | os.PathLike) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(logdir))
    for row in rows:
        writer.add_scalar("validation/loss", row["loss"], row["step"])
        if row.get("ema_loss") is not None:
            writer.add_scalar("validation/ema_loss", row["ema_loss"], row["step"])
    writer.close()


def plot_validation(rows: list[dict[str, Any]], path: str | os.PathLike) -> None:
    """Validation loss per checkpoint, beside the training loss since the checkpoint before."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.5), dpi=100)
    axes = figure.add_subplot()
    steps = [row["step"] for row in rows]
    axes.plot(steps, [row["loss"] for row in rows], marker="o", color="#c0504d",
              label="validation loss")  # fmt: skip
    if any(row.get("ema_loss") is not None for row in rows):
        axes.plot(steps, [row.get("ema_loss") for row in rows], marker="s", color="#7f6000",
                  label="validation loss, moving average")  # fmt: skip
    if all(row["train_loss"] is not None for row in rows):
        axes.plot(steps, [row["train_loss"] for row in rows], marker=".", color="#1f4e79",
                  label="training loss (mean since the checkpoint before)")  # fmt: skip
    axes.set(xlabel="step", ylabel="loss", title="validation loss per checkpoint")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right", fontsize="small")
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", metadata={"Software": None})
