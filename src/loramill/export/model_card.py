"""The model card written beside each export (``exports/<ds>.md``): how to use the adapter,
how it was trained, what it was trained on, and where it came from — all read from the
export's own metadata, so the card never says what the file does not hold."""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

from loramill.export.metadata import FLUX_NETWORK_MODULE, LYCORIS_MODULE
from loramill.files import write_bytes, write_text
from loramill.models.checkpoint import AVERAGE_KEY, PROVENANCE_KEY, STEP_KEY, read_checkpoint
from loramill.report_pages import markdown_page

SETTINGS = (
    "network_type", "network_target", "rank", "alpha", "conv_rank", "conv_alpha", "optimizer_type",
    "learning_rate", "unet_lr", "text_encoder_lr", "train_text_encoder", "lr_scheduler",
    "max_train_steps", "max_train_epochs", "train_batch_size", "gradient_accumulation_steps",
    "mixed_precision", "quantize_base", "min_snr_gamma", "noise_offset", "flip_aug", "repeats",
    "clip_skip",
)  # fmt: skip
# a Flux-family run's settings: its own (loramill.models.flux.family, .layout), without SD's
FLUX_SETTINGS = (
    *(s for s in SETTINGS if s != "clip_skip"),
    "train_blocks", "timestep_sampling", "discrete_flow_shift", "sigmoid_scale",
    "model_prediction_type", "guidance_scale", "t5xxl_max_token_length", "apply_t5_attn_mask",
    "fp8_base",
)  # fmt: skip


def _table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    line = lambda cells: "| " + " | ".join(map(str, cells)) + " |"  # noqa: E731
    return [line(header), line(["---"] * len(header)), *map(line, rows)]


def _single_file(provenance: dict[str, Any]) -> list[tuple[str, str]]:
    source = provenance.get("base_model_file")
    return (
        [("base checkpoint", f"`{source['file']}` (sha256 `{source['sha256']}`)")] if source else []
    )


def _use(name: str, trigger: str, module: str | None) -> list[str]:
    """The card's "Use" lines: which file goes to which client (``module``: the file's
    ss_network_module)."""
    words = ", ".join(f"`{w}`" for w in trigger.split(", ")) if trigger else "none"
    uses = {FLUX_NETWORK_MODULE: _flux_use, LYCORIS_MODULE: _lycoris_use}.get(module, _sd_use)
    return [f"Trigger words: {words}", "", *uses(name)]


def _lycoris_use(name: str) -> list[str]:
    """A LoHa's, LoKr's or DoRA's clients: diffusers and kohya's networks.lora load none as
    trained."""
    return [
        f"AUTOMATIC1111: copy `{name}.safetensors` to `models/Lora/` and add `<lora:{name}:0.7>`"
        " to the prompt (its Lora extension reads LyCORIS's LoHa, LoKr and DoRA). ComfyUI: "
        "`models/loras/`, LoraLoader. kohya sd-scripts: `--network_module lycoris.kohya "
        f"--network_weights {name}.safetensors` (LyCORIS's package, lycoris-lora; kohya's own "
        "networks.lora loads no LoHa or LoKr module, and DoRA as a plain LoRA). diffusers loads "
        "none of these as trained, so there is no diffusers-format file.",
        "",
    ]


def _sd_use(name: str) -> list[str]:
    return [
        f"AUTOMATIC1111: copy `{name}.safetensors` to `models/Lora/` and add `<lora:{name}:0.7>`"
        " to the prompt. ComfyUI: `models/loras/`, LoraLoader. kohya sd-scripts: "
        f"`--network_weights {name}.safetensors`. diffusers:",
        "",
        "```python",
        f'pipe.load_lora_weights("exports", weight_name="{name}.safetensors")',
        "```",
        "",
        f"`{name}.diffusers.safetensors` is the diffusers-format file: diffusers and ComfyUI "
        "load it fully at the trained strength (alpha = rank, the trained scale is in its "
        "weights); AUTOMATIC1111 and kohya sd-scripts take the file above.",
        "",
    ]


def _flux_use(name: str) -> list[str]:
    """A Flux-family LoRA's clients (AUTOMATIC1111 has no Flux; Forge loads as ComfyUI does)."""
    return [
        f"ComfyUI: copy `{name}.safetensors` to `models/loras/`, LoraLoader (or "
        f"LoraLoaderModelOnly). Forge: `models/Lora/`, `<lora:{name}:0.7>` in the prompt. kohya "
        f"sd-scripts (networks.lora_flux): `--network_weights {name}.safetensors`. diffusers:",
        "",
        "```python",
        f'pipe.load_lora_weights("exports", weight_name="{name}.diffusers.safetensors")',
        "```",
        "",
        f"`{name}.diffusers.safetensors` is the diffusers-format file (diffusers' module names, "
        "alpha = rank, the trained scale in its weights); ComfyUI loads it fully too. diffusers "
        "reads the kohya file only at FLUX.1's full width: its converter splits the single "
        "blocks' fused projections at FLUX.1's sizes.",
        "",
    ]


def _averaged(metadata: dict[str, str]) -> str:
    """The card's word on a moving average exported in place of the weights (export.use_ema)."""
    if AVERAGE_KEY not in metadata:
        return ""
    about = json.loads(metadata[AVERAGE_KEY])
    interval = about["update_step_interval"]
    every = "every step" if interval == 1 else f"every {interval} steps"
    return (
        f" The file holds the exponential moving average of its weights (decay "
        f"{about['decay']}, updated {every}), not the weights themselves."
    )


def _validation(result: dict[str, Any] | None, metadata: dict[str, str]) -> list[str]:
    """The card's validation section: each checkpoint's validation loss, the exported one's
    marked (validation.json, rule validate)."""
    if result is None:
        return []
    exported = metadata.get(STEP_KEY)
    rows = [
        (
            f"{row['step']}" + (" (this file)" if str(row["step"]) == exported else ""),
            f"{row['loss']:.6f}",
            "" if row.get("train_loss") is None else f"{row['train_loss']:.6f}",
        )
        for row in result["checkpoints"]
    ]
    return [
        "## Validation",
        "",
        f"Loss on {len(result['images'])} images no step trained on ({result['source']}), the "
        "same noise and timestep per image at every checkpoint:",
        "",
        *_table(("step", "validation loss", "training loss since the checkpoint before"), rows),
        "",
    ]


def model_card(
    kohya_path: str | os.PathLike,
    name: str,
    grid: str,
    grid_image: bool = True,
    validation: dict[str, Any] | None = None,
) -> str:
    """The card's Markdown for the kohya export at ``kohya_path``; ``grid``: the evaluation
    grid's path relative to the card, shown as an image or (``grid_image`` false: the card
    as the report shows it, a page without a location, where a relative path leads nowhere)
    named."""
    metadata = read_checkpoint(kohya_path).metadata
    provenance = json.loads(metadata[PROVENANCE_KEY])
    train = provenance.get("train_config", {})
    trigger = metadata.get("modelspec.trigger_phrase", "")
    module = metadata.get("ss_network_module")
    flux = module == FLUX_NETWORK_MODULE
    settings = FLUX_SETTINGS if flux else SETTINGS
    tags: Counter[str] = Counter()
    for folder in json.loads(metadata.get("ss_tag_frequency", "{}")).values():  # kohya: per folder
        tags.update(folder)
    top = sorted(tags.items(), key=lambda item: (-item[1], item[0]))[:20]
    lines = [
        f"# {name}",
        "",
        f"A LoRA for `{provenance.get('base_model', '?')}` "
        f"({metadata.get('modelspec.architecture', '?')}), trained by loramill for "
        f"{metadata.get('ss_steps', '?')} steps on {provenance.get('num_images', '?')} images."
        + _averaged(metadata),
        "",
        "## Use",
        "",
        *_use(name, trigger, module),
        "## Settings",
        "",
        *_table(("option", "value"), [(k, train[k]) for k in settings if train.get(k) is not None]),
        "",
        "## Tags (top 20)",
        "",
        *_table(("tag", "images"), top),
        "",
        "## Grid",
        "",
        f"![{name}: checkpoints × strengths × prompts]({grid})"
        if grid_image
        else f"`{grid}`, and on the first page of the report.",
        "",
        *_validation(validation, metadata),
        "## Provenance",
        "",
        *_table(("what", "value"), _provenance_rows(provenance, metadata)),
        "",
    ]
    return "\n".join(lines)


def _provenance_rows(provenance: dict[str, Any], metadata: dict[str, str]) -> list[tuple]:
    """The card's provenance table: where the data, the base and the file came from."""
    return [
        ("data fingerprint", f"`{provenance.get('data_fingerprint', '?')}`"),
        ("base model hash", f"`{provenance.get('base_model_hash', '?')}`"),
        *_single_file(provenance),
        ("seed", provenance.get("seed")),
        ("exported", metadata.get("modelspec.date", "?")),
        ("libraries", ", ".join(f"{k} {v}" for k, v in provenance.get("versions", {}).items())),
        ("sshs_model_hash", f"`{metadata.get('sshs_model_hash', '?')}`"),
    ]


def write_model_card(
    kohya_path: str | os.PathLike,
    card_path: str | os.PathLike,
    name: str,
    grid: str,
    validation: dict[str, Any] | None = None,
) -> None:
    """The card as Markdown at ``card_path`` and, beside it with the suffix ``.html``, as a web
    page: the report opens HTML, while Markdown is only a download link there."""
    write_bytes(card_path, model_card(kohya_path, name, grid, validation=validation).encode())
    page = markdown_page(model_card(kohya_path, name, grid, False, validation), name)
    write_text(Path(card_path).with_suffix(".html"), page)
