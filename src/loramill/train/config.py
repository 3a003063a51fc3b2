"""The train section of the config: its options, their checks, and what they imply.

Checks that need only the config run at parse time (rules/common.smk) as well as in the job,
so a mistake stops Snakemake before any job runs; the dataset-size check runs in the job,
after resize has decided which images are usable.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from loramill import LoramillError
from loramill.config import check_replaced, dataset_config, with_schema_defaults
from loramill.models.families import DENOISERS
from loramill.models.network_targets import NETWORK_TARGETS
from loramill.train.optimizers import check_optimizer

# Schedules whose learning rate at step N does not depend on max_train_steps: a longer run
# follows the shorter one's trajectory exactly, so it can continue from its saved state.
TOTAL_FREE_SCHEDULES = ("constant", "constant_with_warmup")
MIXED_PRECISION = ("no", "fp16", "bf16")
LOSS_TYPES = ("l2", "huber", "smooth_l1")
# Options that only decide where a run stops and what it writes out, not its trajectory.
# Options that only decide which checkpoints a run writes out (validation measures those).
SAVING_OPTIONS = ("save_steps", "validate_every_n_steps")
STOPPING_OPTIONS = ("max_train_steps", "max_train_epochs", *SAVING_OPTIONS)
# Options only the validate stage reads (loramill.train.validation): the train stage's params
# leave them out, so changing them measures the checkpoints again and trains nothing.
VALIDATION_ONLY_OPTIONS = ("validation_seed",)
# Options that need regularization images, with the values that mean "none" (the defaults)
REG_OPTIONS = {"prior_loss_weight": 1.0, "reg_caption": None}
# Where a multi-machine run's processes meet: no part of what it trains, and a resubmission
# lands on other machines, so it stays out of fingerprints, provenance and the state's key.
LAUNCH_OPTIONS = ("rdzv_endpoint",)
# Where the frozen weights wait between uses (loramill.models.block_swap): the same arithmetic
# on other memory, so no part of what a run trains either.
PLACEMENT_OPTIONS = ("blocks_to_swap",)
# Options the train and validate jobs read from the config as it is: out of the stages'
# params, and so of fingerprints, provenance and the resumable state's key.
RUN_OPTIONS = (*LAUNCH_OPTIONS, *PLACEMENT_OPTIONS)
# blocks_to_swap moves weights between host and GPU memory (the tests add the CPU, to train
# on a GPU's rules in its memory)
SWAP_DEVICES = ("cuda",)
# The options that decide how a caption or prompt is read, the fields of the families'
# conditioning (SD's and SDXL's CLIP layer and length, Flux's T5 length and mask): the grid
# reads its prompts with them as training read its captions.
PROMPT_OPTIONS = ("clip_skip", "max_token_length", "t5xxl_max_token_length", "apply_t5_attn_mask")


@dataclass(frozen=True)
@with_schema_defaults("train")  # every option's default is the schema's
class TrainConfig:
    # The network (loramill.models.network).
    network_target: str
    network_type: str  # lora | loha | lokr | dora (models.network)
    factor: int  # lokr: LyCORIS's factor, decompose_both and full_matrix
    decompose_both: bool
    full_matrix: bool
    rank: int
    alpha: float
    conv_rank: int | None  # kohya_conv's 3×3 convs; None = rank
    conv_alpha: float | None  # None = alpha
    # kohya's block-wise ranks and alphas of the UNet's modules (models.unet_blocks)
    block_dims: tuple[int, ...] | None
    block_alphas: tuple[float, ...] | None
    conv_block_dims: tuple[int, ...] | None
    conv_block_alphas: tuple[float, ...] | None
    # kohya's block learning-rate weights (a list, or a preset name for down and up)
    down_lr_weight: tuple[float, ...] | str | None
    mid_lr_weight: tuple[float, ...] | None
    up_lr_weight: tuple[float, ...] | str | None
    block_lr_zero_threshold: float
    network_dropout: float
    rank_dropout: float
    module_dropout: float
    learning_rate: float
    # SDXL: also a tuple, one rate per text encoder (text_encoder_lrs). The annotation stays
    # float: this class is part of the text stages' code fingerprint too.
    text_encoder_lr: float
    train_text_encoder: bool
    max_train_steps: int
    max_train_epochs: int | None  # when set, the steps those epochs take (wins)
    train_batch_size: int
    gradient_accumulation_steps: int
    save_steps: int
    seed: int
    lr_scheduler: str
    lr_warmup_steps: int
    max_grad_norm: float
    # an exponential moving average of the adapter (loramill.train.ema)
    ema: bool
    ema_decay: float
    ema_update_step_interval: int
    ema_device: str
    # a validation loss per checkpoint (loramill.train.validation; kohya's names)
    validation_split: float  # the fraction of images held out of training, by content
    validation_seed: int | None  # None: seed
    validate_every_n_steps: int | None  # checkpoints at these steps too; None: save_steps
    # regularization images (loramill.train.regularization; kohya's names)
    reg_data: str | None  # a folder or another dataset; None: data/<ds>/reg/ if there
    prior_loss_weight: float
    reg_caption: str | None
    # the loss weighted by each image's mask (loramill.prepare.masks; kohya's names)
    masked_loss: bool
    alpha_mask: bool  # an image's transparency is its mask when it has no mask file
    noise_offset: float
    # Loss and noise (loramill.train.objective).
    multires_noise_iterations: int
    multires_noise_discount: float
    ip_noise_gamma: float
    min_timestep: int  # timesteps drawn from [min_timestep, max_timestep), as kohya's
    max_timestep: int | None  # None: the scheduler's num_train_timesteps
    min_snr_gamma: float
    scale_v_pred_loss_like_noise_pred: bool
    loss_type: str
    huber_c: float
    # Optimizer and schedule (loramill.train.optimizers).
    optimizer_type: str
    optimizer_args: dict
    unet_lr: float | None
    # LoRA+: up matrices at ratio × their rate (optimizers.loraplus_groups; None: no ratio)
    loraplus_lr_ratio: float | None
    loraplus_unet_lr_ratio: float | None
    loraplus_text_encoder_lr_ratio: float | None
    lr_scheduler_num_cycles: int
    lr_scheduler_power: float
    repeats: int  # times each image is seen per epoch
    flip_aug: bool  # mirror images left to right half the time
    clip_skip: int  # 1 = CLIP's last layer; 2 = the one before (kohya's clip_skip)
    max_token_length: int  # 150 or 225: longer captions, read in chunks of 75
    gradient_checkpointing: bool
    sdpa: bool  # torch's scaled_dot_product_attention; False = the plain math attention
    # False: encode each batch's images every step (no latent cache on disk; slower).
    cache_latents: bool
    # Samples during training (loramill.train.samples; kohya's names).
    sample_every_n_steps: int
    sample_prompts: tuple[str, ...]
    sample_sampler: str
    sample_steps: int
    mixed_precision: str
    # Images per vae.encode call. Latents are cached per image, so a call always gets exactly
    # this many images (the last chunk is padded): on CPU a latent's bits depend on the batch
    # shape it was encoded in, and a fresh run must match an incremental one.
    vae_batch_size: int
    init_from: str
    # Captions as training sees them (loramill.train.caption_variation; kohya's names).
    shuffle_caption: bool
    keep_tokens: int
    keep_tokens_separator: str
    caption_dropout_rate: float
    caption_tag_dropout_rate: float
    caption_prefix: str
    caption_suffix: str
    # FLUX.1 and Chroma (loramill.train.flow_matching; kohya's flux_train_network names)
    timestep_sampling: str
    sigmoid_scale: float
    discrete_flow_shift: float
    model_prediction_type: str
    guidance_scale: float  # [dev]'s guidance embedding
    t5xxl_max_token_length: int | None  # None: the family's default (256 [schnell], else 512)
    apply_t5_attn_mask: bool | None  # None: the family's default (off; Chroma always masks)
    train_blocks: str  # all | double | single
    fp8_base: bool  # the frozen denoiser's Linear weights in float8, computed in bf16
    quantize_base: str | None  # int8 | nf4: the same weights by bitsandbytes (models.quantize)
    blocks_to_swap: int  # Flux: blocks whose frozen weights wait in CPU memory (block_swap)
    # CPU kernels split reductions by thread count, so it is part of what makes a run
    # bit-reproducible: fixed here rather than taken from the scheduler.
    threads: int
    # data-parallel processes (loramill.train.distributed); train_batch_size is per process
    num_processes: int
    num_machines: int  # each running num_processes; torchrun's --nnodes
    rdzv_endpoint: str  # HOST:PORT where the machines meet; torchrun's --rdzv-endpoint

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
        self.check_network_type()
        if self.quantize_base and self.fp8_base:
            raise LoramillError(
                f"train.quantize_base: {self.quantize_base} and train.fp8_base: true both store "
                "the frozen weights; choose one"
            )
        self.check_block_swap()
        if self.max_timestep is not None and self.max_timestep <= self.min_timestep:
            raise LoramillError(
                f"train.max_timestep {self.max_timestep}: must be above train.min_timestep "
                f"({self.min_timestep}); timesteps are drawn from min_timestep … max_timestep - 1"
            )
        if self.lr_scheduler == "constant" and self.lr_warmup_steps:
            raise LoramillError(
                f"train.lr_warmup_steps: {self.lr_warmup_steps} has no effect with "
                "lr_scheduler: constant; use lr_scheduler: constant_with_warmup"
            )
        self.check_no_effect()

    def check_block_swap(self) -> None:
        if self.blocks_to_swap < 0:
            raise LoramillError(
                f"train.blocks_to_swap {self.blocks_to_swap}: use 0 (no swapping) or more"
            )
        if not self.blocks_to_swap:
            return
        if not self.gradient_checkpointing:
            raise LoramillError(
                "train.blocks_to_swap needs train.gradient_checkpointing: true (a swapped "
                "block's weights come back for the backward pass when its activations are "
                "recomputed there); set it"
            )
        if self.quantize_base:
            raise LoramillError(
                f"train.blocks_to_swap: not with quantize_base: {self.quantize_base} "
                "(bitsandbytes quantizes a weight as it moves to the GPU); use fp8_base"
            )

    def check_network_type(self) -> None:
        """Options the LyCORIS types (loha, lokr) and DoRA cannot take."""
        if self.factor == 0:
            raise LoramillError("train.factor 0: use -1 (near the square root) or a divisor")
        if self.network_type == "lora":
            return
        lycoris = self.network_type in ("loha", "lokr")
        refused = [
            # LoHa and LoKr have no rank activations for kohya's network_dropout to drop
            ("network_dropout", lycoris),
            # DoRA's magnitude scales the layer's input whatever the dropped LoRA branch does: a
            # dropped module would be neither the base nor the trained one
            ("module_dropout", self.network_type == "dora"),
            # LoRA+ raises the up matrices' rate: LoHa and LoKr have no up and down pair
            ("loraplus_lr_ratio", lycoris),
            ("loraplus_unet_lr_ratio", lycoris),
            ("loraplus_text_encoder_lr_ratio", lycoris),
            # peft's LoHa, LoKr and DoRA layers do not wrap float8 or bitsandbytes weights
            ("fp8_base", True),
            ("quantize_base", True),
        ]
        for key, applies in refused:
            if applies and getattr(self, key) != getattr(TrainConfig, key):
                raise LoramillError(
                    f"train.{key}: not available with network_type: {self.network_type}; "
                    "use network_type: lora, or drop it"
                )

    def check_no_effect(self) -> None:
        """An option set away from its default where the option it belongs to is off."""
        needs = [
            ("conv_rank", "network_target", "kohya_conv"),
            ("conv_alpha", "network_target", "kohya_conv"),
            ("alpha_mask", "masked_loss", "true"),
            ("ema_decay", "ema", "true"),
            ("ema_update_step_interval", "ema", "true"),
            ("ema_device", "ema", "true"),
            ("factor", "network_type", "lokr"),
            ("decompose_both", "network_type", "lokr"),
            ("full_matrix", "network_type", "lokr"),
            ("lr_scheduler_num_cycles", "lr_scheduler", "cosine_with_restarts"),
            ("lr_scheduler_power", "lr_scheduler", "polynomial"),
            ("huber_c", "loss_type", ("huber", "smooth_l1")),
            ("vae_batch_size", "cache_latents", "true"),  # per step: the batch is the batch
            ("fp8_base", "mixed_precision", "bf16"),  # float8 weights compute in bfloat16
        ]
        if self.num_machines == 1:
            needs.append(("rdzv_endpoint", "num_machines", "N > 1"))
        if not self.sample_every_n_steps:  # every sample option needs samples
            for key in ("sample_prompts", "sample_sampler", "sample_steps"):
                needs.append((key, "sample_every_n_steps", "N > 0"))
        for key, owner, wanted in needs:
            default = getattr(TrainConfig, key)  # the schema's
            value, current = getattr(self, key), getattr(self, owner)
            allowed = wanted if isinstance(wanted, tuple) else (wanted,)
            if isinstance(current, bool):  # as YAML spells it
                current = str(current).lower()
            if value != default and current not in allowed:
                raise LoramillError(
                    f"train.{key}: {value} has no effect with train.{owner}: {current}; "
                    f"use {owner}: {' or '.join(allowed)}, or drop {key}"
                )
        discount = self.multires_noise_discount
        if discount != TrainConfig.multires_noise_discount and not self.multires_noise_iterations:
            raise LoramillError(
                "train.multires_noise_discount has no effect with "
                "train.multires_noise_iterations: 0; set the iterations, or drop the discount"
            )

    def check_machines(self) -> None:
        """Several machines meet at one endpoint, which every machine's job must name. Checked
        at parse time and at launch, not in :meth:`check`: the stages' params leave the
        endpoint out (RUN_OPTIONS), and they are parsed too (the state's key, export)."""
        if self.num_machines == 1:
            return
        if not self.rdzv_endpoint:
            raise LoramillError(
                f"train.rdzv_endpoint: num_machines: {self.num_machines} needs HOST:PORT, "
                "a free port on the first machine, where every machine's train job meets"
            )
        host, _, port = self.rdzv_endpoint.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise LoramillError(
                f"train.rdzv_endpoint '{self.rdzv_endpoint}': use HOST:PORT (node001:29500)"
            )

    def for_epochs(self, batches_per_epoch: int) -> TrainConfig:
        """With ``max_train_epochs``, the config whose max_train_steps those epochs take."""
        if not self.max_train_epochs:
            return self
        per_step = self.gradient_accumulation_steps
        steps = -(-batches_per_epoch * self.max_train_epochs // per_step)  # ceiling
        return replace(self, max_train_steps=steps)

    @property
    def world_size(self) -> int:
        """Processes of the run, on every machine."""
        return self.num_processes * self.num_machines

    @property
    def global_batch_size(self) -> int:
        """Examples per batch over every process: what one batch of the data order holds."""
        return self.train_batch_size * self.world_size

    def check_dataset(self, images: int) -> None:
        if self.global_batch_size > images:
            times = f" × {self.world_size} processes" if self.world_size > 1 else ""
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
        if self.blocks_to_swap and device_type not in SWAP_DEVICES:
            raise LoramillError(
                f"train.blocks_to_swap: swapping blocks between CPU and GPU memory needs a CUDA "
                f"GPU, and the device is {device_type}; remove it"
            )

    @property
    def network(self) -> Any:
        """The LoRA network trained (loramill.models.network.NetworkSpec)."""
        from loramill.models.network import NetworkSpec

        return NetworkSpec.from_config(self)

    @property
    def checkpoint_steps(self) -> list[int]:
        """The steps a run writes checkpoints at: every save_steps and, with
        validate_every_n_steps, every such step too (validation measures checkpoints); the
        last step always."""
        from loramill.models.checkpoint import checkpoint_steps

        steps = checkpoint_steps(self.max_train_steps, self.save_steps)
        if self.validate_every_n_steps:
            steps += checkpoint_steps(self.max_train_steps, self.validate_every_n_steps)
        return sorted(set(steps))

    @property
    def continues(self) -> bool:
        """Whether a longer run of this config may continue a shorter one's saved state."""
        return self.lr_scheduler in TOTAL_FREE_SCHEDULES

    def as_dict(self) -> dict[str, Any]:
        """The options that make the run what it is (its provenance): not where it met or
        where its weights waited."""
        return {k: v for k, v in asdict(self).items() if k not in RUN_OPTIONS}


def run_options(config: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The RUN_OPTIONS of ``dataset``'s train section in the workflow's ``config``: its
    train and validate jobs take them from there, not from their params."""
    train = dataset_config(config, dataset)["train"]
    return {key: train[key] for key in RUN_OPTIONS if key in train}


def _tuples(config: dict[str, Any]) -> dict[str, Any]:
    # lists from YAML as tuples: the config is frozen and hashable
    return {k: tuple(v) for k, v in config.items() if isinstance(v, list) and k != "optimizer_args"}


def text_encoder_lrs(cfg: TrainConfig, components: Any) -> dict[str, float]:
    """The learning rate of each trained text encoder among ``components`` (names)."""
    names = [name for name in components if name not in DENOISERS]
    rates = cfg.text_encoder_lr
    if not isinstance(rates, tuple):
        rates = (rates,) * len(names)
    if names and len(rates) != len(names):
        raise LoramillError(
            f"train.text_encoder_lr: {len(rates)} rates for {len(names)} text encoders; "
            "give one number, or a list of one per text encoder (SDXL has two)"
        )
    return dict(zip(names, map(float, rates), strict=False))
