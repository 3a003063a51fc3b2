"""The train section of the config: its options, their checks, and what they imply.

Checks that need only the config run at parse time (rules/common.smk) as well as in the job,
so a mistake stops Snakemake before any job runs; the dataset-size check runs in the job,
after resize has decided which images are usable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from loramill import LoramillError
from loramill.optimizers import check_optimizer

# Schedules whose learning rate at step N does not depend on max_train_steps: a longer run
# follows the shorter one's trajectory exactly, so it can continue from its saved state.
TOTAL_FREE_SCHEDULES = ("constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "fp16", "bf16")
LOSS_TYPES = ("l2", "huber", "smooth_l1")
NETWORK_TARGETS = ("attention", "kohya", "kohya_conv")  # loramill.network
# Options that only decide where a run stops and what it writes out, not its trajectory.
STOPPING_OPTIONS = ("max_train_steps", "max_train_epochs", "save_steps")
REPLACED = {
    "dtype": "replaced by train.mixed_precision (no | fp16 | bf16); LoRA weights and "
    "optimizer state always stay float32",
}


@dataclass(frozen=True)
class TrainConfig:
    # The network (loramill.network).
    network_target: str = "kohya"
    rank: int = 8
    alpha: float = 8.0
    conv_rank: int | None = None  # kohya_conv's 3×3 convs; None = rank
    conv_alpha: float | None = None  # None = alpha
    network_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    learning_rate: float = 1e-4
    text_encoder_lr: float = 5e-5
    train_text_encoder: bool = False
    max_train_steps: int = 100
    max_train_epochs: int | None = None  # when set, the steps those epochs take (wins)
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    save_steps: int = 50
    seed: int = 42
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_grad_norm: float = 1.0
    noise_offset: float = 0.0
    # Loss and noise (loramill.train_objective).
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    min_snr_gamma: float = 0.0
    scale_v_pred_loss_like_noise_pred: bool = False
    loss_type: str = "l2"
    huber_c: float = 0.1
    # Optimizer and schedule (loramill.optimizers).
    optimizer_type: str = "AdamW"
    optimizer_args: dict = field(default_factory=dict)
    unet_lr: float | None = None
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    repeats: int = 1  # times each image is seen per epoch
    flip_aug: bool = False  # mirror images left to right half the time
    clip_skip: int = 1  # 1 = CLIP's last layer; 2 = the one before (kohya's clip_skip)
    max_token_length: int = 75  # 150 or 225: longer captions, read in chunks of 75
    gradient_checkpointing: bool = False
    sdpa: bool = True  # torch's scaled_dot_product_attention; False = the plain math attention
    # False: encode each batch's images every step (no latent cache on disk; slower).
    cache_latents: bool = True
    # Samples during training (loramill.train_samples; kohya's names).
    sample_every_n_steps: int = 0
    sample_prompts: tuple[str, ...] = ("{trigger}",)
    sample_sampler: str = "ddim"
    sample_steps: int = 20
    mixed_precision: str = "no"
    # Images per vae.encode call. Latents are cached per image, so a call always gets exactly
    # this many images (the last chunk is padded): on CPU a latent's bits depend on the batch
    # shape it was encoded in, and a fresh run must match an incremental one.
    vae_batch_size: int = 1
    init_from: str = ""
    # Captions as training sees them (loramill.train_captions; kohya's names).
    shuffle_caption: bool = False
    keep_tokens: int = 0
    keep_tokens_separator: str = ""
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    caption_prefix: str = ""
    caption_suffix: str = ""
    # CPU kernels split reductions by thread count, so it is part of what makes a run
    # bit-reproducible: fixed here rather than taken from the scheduler.
    threads: int = 2
    # data-parallel processes (loramill.distributed); train_batch_size is per process
    num_processes: int = 1

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> TrainConfig:
        check_replaced(config)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise LoramillError(f"train.{unknown[0]}: unknown option")
        cfg = cls(**{**config, **_tuples(config)})
        cfg.check()
        return cfg

    def check(self) -> None:
        """Combinations the schema cannot express; each error names the key to change."""
        if self.mixed_precision not in MIXED_PRECISION:
            choices = " | ".join(MIXED_PRECISION)
            raise LoramillError(f"train.mixed_precision '{self.mixed_precision}': use {choices}")
        if self.max_token_length not in (75, 150, 225):
            raise LoramillError(
                f"train.max_token_length {self.max_token_length}: use 75, 150 or 225"
            )
        if self.network_target not in NETWORK_TARGETS:
            choices = " | ".join(NETWORK_TARGETS)
            raise LoramillError(f"train.network_target '{self.network_target}': use {choices}")
        if self.loss_type not in LOSS_TYPES:
            raise LoramillError(f"train.loss_type '{self.loss_type}': use {' | '.join(LOSS_TYPES)}")
        check_optimizer(self)
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise LoramillError(
                f"train.lr_warmup_steps: {self.lr_warmup_steps} has no effect with "
                "lr_scheduler: constant; use lr_scheduler: constant_with_warmup"
            )
        self.check_no_effect()

    def check_no_effect(self) -> None:
        """An option set away from its default where the option it belongs to is off."""
        needs = [
            ("conv_rank", None, "network_target", "kohya_conv"),
            ("conv_alpha", None, "network_target", "kohya_conv"),
            ("lr_scheduler_num_cycles", 1, "lr_scheduler", "cosine_with_restarts"),
            ("lr_scheduler_power", 1.0, "lr_scheduler", "polynomial"),
            ("huber_c", 0.1, "loss_type", ("huber", "smooth_l1")),
            ("vae_batch_size", 1, "cache_latents", "true"),  # per step: the batch is the batch
        ]
        if not self.sample_every_n_steps:  # every sample option needs samples
            for key in ("sample_prompts", "sample_sampler", "sample_steps"):
                needs.append((key, getattr(TrainConfig, key), "sample_every_n_steps", "N > 0"))
        for key, default, owner, wanted in needs:
            value, current = getattr(self, key), getattr(self, owner)
            allowed = wanted if isinstance(wanted, tuple) else (wanted,)
            if isinstance(current, bool):  # as YAML spells it
                current = str(current).lower()
            if value != default and current not in allowed:
                raise LoramillError(
                    f"train.{key}: {value} has no effect with train.{owner}: {current}; "
                    f"use {owner}: {' or '.join(allowed)}, or drop {key}"
                )
        if self.multires_noise_discount != 0.3 and not self.multires_noise_iterations:
            raise LoramillError(
                "train.multires_noise_discount has no effect with "
                "train.multires_noise_iterations: 0; set the iterations, or drop the discount"
            )

    def for_epochs(self, batches_per_epoch: int) -> TrainConfig:
        """With ``max_train_epochs``, the config whose max_train_steps those epochs take."""
        if not self.max_train_epochs:
            return self
        per_step = self.gradient_accumulation_steps
        steps = -(-batches_per_epoch * self.max_train_epochs // per_step)  # ceiling
        return replace(self, max_train_steps=steps)

    @property
    def global_batch_size(self) -> int:
        """Examples per batch over every process: what one batch of the data order holds."""
        return self.train_batch_size * self.num_processes

    def check_dataset(self, images: int) -> None:
        if self.global_batch_size > images:
            times = f" × {self.num_processes} processes" if self.num_processes > 1 else ""
            raise LoramillError(
                f"train.train_batch_size: {self.train_batch_size}{times} is more than the "
                f"dataset's {images} usable image{'s' if images != 1 else ''}; lower it or add "
                "images"
            )

    def check_device(self, device_type: str) -> None:
        if self.optimizer_type == "AdamW8bit" and device_type != "cuda":
            raise LoramillError(
                f"train.optimizer_type: AdamW8bit (bitsandbytes) needs a CUDA GPU, and the "
                f"device is {device_type}; use AdamW, Lion, Prodigy or Adafactor"
            )
        if self.mixed_precision == "fp16" and device_type != "cuda":
            raise LoramillError(
                f"train.mixed_precision: fp16 needs a CUDA GPU (gradient scaling), and the "
                f"device is {device_type}; use bf16 or no"
            )

    @property
    def network(self) -> Any:
        """The LoRA network trained (loramill.network.NetworkSpec)."""
        from loramill.network import NetworkSpec

        return NetworkSpec.from_config(self)

    @property
    def conditioning(self) -> Any:
        """How captions are encoded (loramill.latents.Conditioning)."""
        from loramill.latents import Conditioning  # here: parsing the workflow skips torch

        return Conditioning(self.clip_skip, self.max_token_length)

    @property
    def continues(self) -> bool:
        """Whether a longer run of this config may continue a shorter one's saved state."""
        return self.lr_scheduler in TOTAL_FREE_SCHEDULES

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tuples(config: dict[str, Any]) -> dict[str, Any]:
    # lists from YAML as tuples: the config is frozen and hashable
    return {k: tuple(v) for k, v in config.items() if isinstance(v, list) and k != "optimizer_args"}


def check_replaced(section: Any, where: str = "train") -> None:
    if not isinstance(section, dict):
        return  # the schema reports it
    for key, hint in REPLACED.items():
        if key in section:
            raise LoramillError(f"{where}.{key}: {hint}")


def checkpoint_steps(max_train_steps: int, save_steps: int) -> list[int]:
    """Steps at which checkpoints are written: every save_steps, and always the last step."""
    return sorted({*range(save_steps, max_train_steps + 1, save_steps), max_train_steps})
