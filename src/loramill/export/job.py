"""The export job: both files of a run's exported checkpoint (its last, or its best by validation
loss) and a kohya file of every checkpoint,
each verified against the base model by the verification of its family (a UNet base:
loramill.export.verify; a Flux transformer: loramill.export.flux.verify), and the model card."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.export.verify import verify_exports
from loramill.models.checkpoint import AVERAGE_PREFIX, CHOICE_KEY, STEP_PREFIX
from loramill.train.ranking import best_checkpoint, read_result

log = logging.getLogger(__name__)


def step_export_name(name: str, checkpoint: Path) -> str:
    """``<ds>-NNNNNN.safetensors`` (kohya's naming of intermediate saves) for checkpoint
    ``step-NNNNNN.safetensors``: distinct names when several land in one models/Lora/."""
    return f"{name}-{checkpoint.name.removeprefix(AVERAGE_PREFIX).removeprefix(STEP_PREFIX)}"


def export_and_verify(
    checkpoints_dir: str | os.PathLike,
    kohya_path: str | os.PathLike,
    diffusers_path: str | os.PathLike | None,
    card_path: str | os.PathLike,
    steps_dir: str | os.PathLike,
    output_name: str,
    export: dict[str, Any],
    base_model: str,
    allow_unsafe_weights: bool,
    train: dict[str, Any],
    validation_json: str | os.PathLike | None = None,
) -> None:
    """The export job: both files of the last checkpoint (the kohya file alone for LoHa,
    LoKr and DoRA, ``diffusers_path`` None) and a kohya file of every checkpoint, their
    verification against the base model (a failure fails the job, and Snakemake removes the
    files), the model card."""
    from loramill.export.model_card import write_model_card
    from loramill.export.write import export_adapter
    from loramill.models.base_model import base_family
    from loramill.models.checkpoint import list_checkpoints
    from loramill.train.config import TrainConfig

    cfg = TrainConfig.from_dict(train)
    if base_family(base_model).denoiser == "transformer":
        from loramill.export.flux.verify import flux_verifier as verifier  # Flux only: lazily
    else:
        verifier = unet_verifier
    options, verify = verifier(base_model, allow_unsafe_weights, cfg)
    # export.use_ema: the moving average's checkpoints (train.ema), which say so in metadata
    checkpoints = list_checkpoints(checkpoints_dir, average=export.get("use_ema", False))
    options["save_precision"] = export["save_precision"]
    validation = read_result(validation_json) if validation_json else None
    chosen, choice = exported_checkpoint(checkpoints, export, validation)
    export_adapter(chosen, kohya_path, diffusers_path, output_name, **options, extra=choice)
    exports = {Path(kohya_path): chosen}
    if diffusers_path is not None:
        exports[Path(diffusers_path)] = chosen
    else:  # LoHa, LoKr, DoRA (config.NO_DIFFUSERS_FILE): no file, not even an older run's
        drop_stale_diffusers_file(Path(kohya_path), output_name)
    for checkpoint in checkpoints:  # picking the best step from the grid is what users do next
        path = Path(steps_dir) / step_export_name(output_name, checkpoint)
        export_adapter(checkpoint, path, None, output_name, **options)
        exports[path] = checkpoint
    verify(exports)
    grid = os.path.relpath(Path("grids") / f"{output_name}.png", Path(card_path).parent)
    write_model_card(kohya_path, card_path, output_name, grid, validation)


def exported_checkpoint(
    checkpoints: list[Path], export: dict[str, Any], validation: dict[str, Any] | None
) -> tuple[Path, dict[str, str]]:
    """The checkpoint exports/<ds>.safetensors is (export.checkpoint: the last, or the best by
    validation loss) and, for the best, the metadata that says so."""
    if export.get("checkpoint", "last") == "last":
        return checkpoints[-1], {}
    if validation is None:
        raise LoramillError("export.checkpoint: best needs the validation result")
    average = export.get("use_ema", False)
    best = best_checkpoint(validation, average)
    path = next((p for p in checkpoints if p.name.endswith(best["file"])), None)
    if path is None:
        raise LoramillError(f"export.checkpoint: best is {best['file']}, which is gone")
    record = {"checkpoint": "best", "step": best["step"], "validation_loss": best["loss"]}
    record["validation"] = validation["source"] + (", moving average" if average else "")
    return path, {CHOICE_KEY: json.dumps(record, sort_keys=True)}


def drop_stale_diffusers_file(kohya_path: Path, output_name: str) -> None:
    """A dataset that trained LoRA before has its diffusers-format file beside the kohya
    file; this network has none, and that file is not this adapter."""
    stale = kohya_path.with_name(f"{output_name}.diffusers.safetensors")
    if stale.is_file():
        stale.unlink()
        log.info("%s: removed, the diffusers-format file of an earlier network", stale)


def unet_verifier(
    base_model: str, allow_unsafe_weights: bool, cfg: Any
) -> tuple[dict[str, Any], Callable[[dict[Path, Path]], None]]:
    """The export options and the verification of a run on a Stable Diffusion (UNet) base:
    the whole pipeline in float32, the UNet's config for SDXL's kohya names."""
    from loramill.models.base_model import load_pipeline, pipeline_family

    pipe = load_pipeline(base_model, "float32", allow_unsafe_weights)
    text_encoders = pipeline_family(pipe).text_encoders
    models = {c: getattr(pipe, c) for c in ("unet", *text_encoders)}
    trained = {"unet", *text_encoders} if cfg.train_text_encoder else {"unet"}

    def verify(exports: dict[Path, Path]) -> None:
        verify_exports(exports, models, cfg.network, trained)

    return {"unet_config": pipe.unet.config}, verify
