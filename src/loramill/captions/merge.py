"""Stage 3: merge human caption edits over auto captions into the training captions.

Edits (loramill.captions.edits: ``data/<ds>/metadata.csv`` and sidecars in
``data/<ds>/captions/``) are only ever read. The rules and their order are in
loramill.captions.merge_rules. Besides the captions the stage reports, per dataset: edits applied
(those that changed a caption), stale (the image changed since the row recorded its
``image_sha256``) and orphaned (no such image: kept, reported, never deleted), in
``caption_report.json`` and, row by row, in ``caption_report.csv``; the images metadata.csv has
no row for yet; and it warns about captions longer than the text encoder reads.
"""

from __future__ import annotations

import csv
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loramill.captions.edits import Edit, read_edits
from loramill.captions.merge_rules import Rules, training_caption
from loramill.dataset_files import match_key
from loramill.files import atomic_path, read_jsonl, write_json, write_jsonl, write_text

log = logging.getLogger(__name__)


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Comma-separated tags counted over all captions (kohya's ss_tag_frequency)."""
    counts = Counter(tag.strip() for c in captions for tag in c.split(",") if tag.strip())
    return dict(sorted(counts.items()))


def edit_problems(auto: list[dict[str, Any]], edits: dict[str, Edit]) -> list[dict[str, str]]:
    """Stale and orphaned edits, as report rows."""
    by_key = {match_key(record["image"]): record for record in auto}
    rows = []
    for key, edit in sorted(edits.items(), key=lambda item: item[1].origin):
        record = by_key.get(key)
        if record is None:
            rows.append({"edit": edit.origin, "image": "", "problem": "orphaned: no such image"})
        elif edit.image_sha256 and edit.image_sha256 != record.get("image_sha256"):
            problem = "stale: the image changed since this edit was written"
            rows.append({"edit": edit.origin, "image": record["image"], "problem": problem})
    return rows


def too_long(captions: dict[str, str], base_model: str | None) -> list[tuple[str, int]]:
    """(image, tokens) of captions over the text encoder's limit, counted with its tokenizer."""
    if not base_model:
        return []
    try:
        from transformers import AutoTokenizer

        from loramill.models.base_model import resolve_base_model
        from loramill.models.families import family_code, folder_family

        source = resolve_base_model(base_model)
        local = Path(source).exists()
        # The family's last tokenizer is the one whose limit cuts a caption short: CLIP's for
        # SD and SDXL (75 tokens; both of SDXL's are CLIP's), T5's for FLUX.1 (CLIP-L only
        # gives the pooled vector) and Chroma. A folder without a UNet config: SD's layout.
        subfolder = family_code(folder_family(Path(source)) or "sd1").tokenizers[-1]
        tokenizer = AutoTokenizer.from_pretrained(
            source, subfolder=subfolder, local_files_only=local
        )
    except Exception as error:  # the count is advice: never fail the merge for it
        log.warning("cannot count caption tokens (%s: %s)", type(error).__name__, error)
        return []
    limit = tokenizer.model_max_length - tokenizer.num_special_tokens_to_add()  # start, end
    counts = {
        image: len(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        for image, text in captions.items()
    }
    return [(image, n) for image, n in sorted(counts.items()) if n > limit]


def write_report_csv(path: str | os.PathLike, rows: list[dict[str, str]]) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["edit", "image", "problem"])
        writer.writeheader()
        writer.writerows(rows)


def write_sidecars(folder: Path, records: list[dict[str, Any]], enabled: bool) -> None:
    """kohya's ``<stem>.txt`` beside nothing: one per training caption, for other trainers
    (the folder is made either way: it is the rule's output)."""
    folder.mkdir(parents=True, exist_ok=True)
    for record in records if enabled else []:
        write_text(folder / f"{Path(record['image']).stem}.txt", record["caption"] + "\n")


@dataclass
class Merged:
    """The training captions, and what the edits did to them."""

    records: list[dict[str, Any]] = field(default_factory=list)
    excluded: list[str] = field(default_factory=list)
    applied: int = 0  # edits that changed an image's training caption (or excluded it)
    unchanged: int = 0  # edits whose result is the auto caption's
    no_edit_row: list[str] = field(default_factory=list)  # images without an edit


def merged_captions(auto: list[dict[str, Any]], edits: dict[str, Edit], rules: Rules) -> Merged:
    """Every image's training caption, sorted; an edit counts as applied only when the
    caption it makes differs from the auto caption's (a seeded, untouched row does not)."""
    merged = Merged()
    for record in sorted(auto, key=lambda r: r["image"]):
        edit = edits.get(match_key(record["image"]))
        caption = training_caption(record["caption"], edit, rules)
        if edit is None:
            merged.no_edit_row.append(record["image"])
        elif caption == training_caption(record["caption"], None, rules):
            merged.unchanged += 1
        else:
            merged.applied += 1
        if caption is None:
            merged.excluded.append(record["image"])
            continue
        source = "auto" if edit is None else "human"
        merged.records.append({"image": record["image"], "caption": caption, "source": source})
    return merged


def summary(
    merged: Merged, problems: list[dict[str, str]], long: list[tuple[str, int]]
) -> dict[str, Any]:
    """caption_report.json."""
    records = merged.records
    return {
        "images": len(records),
        "human": sum(r["source"] == "human" for r in records),
        "auto": sum(r["source"] == "auto" for r in records),
        "excluded": merged.excluded,
        "edits": {
            "applied": merged.applied,
            "unchanged": merged.unchanged,
            "stale": [p["edit"] for p in problems if p["problem"].startswith("stale")],
            "orphaned": [p["edit"] for p in problems if p["problem"].startswith("orphaned")],
        },
        "no_edit_row": merged.no_edit_row,
        "too_long": dict(long),
        "tag_frequency": tag_frequency([r["caption"] for r in records]),
    }


def merge_captions(
    auto_jsonl: str | os.PathLike,
    captions_dir: str | os.PathLike | None,
    out_jsonl: str | os.PathLike,
    report_json: str | os.PathLike,
    trigger: str | list[str],
    metadata_csv: str | os.PathLike | None = None,
    report_csv: str | os.PathLike | None = None,
    settings: dict[str, Any] | None = None,
    base_model: str | None = None,
    name: str = "",
    sidecars_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Write the training captions (``{"image", "caption", "source"}`` per image, sorted)."""
    auto = read_jsonl(auto_jsonl)
    edits = read_edits(metadata_csv, captions_dir)
    words = [trigger] if isinstance(trigger, str) else list(trigger)
    merged = merged_captions(auto, edits, Rules.from_config(settings or {}, words))
    if metadata_csv is None or not Path(metadata_csv).is_file():
        merged.no_edit_row = []  # sidecars are per image, as wanted: none missing
    records = merged.records
    write_jsonl(out_jsonl, records)
    if sidecars_dir is not None:
        write_sidecars(Path(sidecars_dir), records, bool((settings or {}).get("write_sidecars")))
    problems = edit_problems(auto, edits)
    for row in problems:
        log.warning("caption edit %s: %s", row["edit"], row["problem"])
    long = too_long({r["image"]: r["caption"] for r in records}, base_model)
    if long:
        listed = ", ".join(f"{image} ({n})" for image, n in long[:5])
        log.warning("%d caption(s) exceed the text encoder's limit: %s", len(long), listed)
    report = summary(merged, problems, long)
    write_json(report_json, report)
    if report_csv is not None:
        write_report_csv(report_csv, problems)
    log_report(name or Path(auto_jsonl).parent.name, report)
    return report


def log_report(name: str, report: dict[str, Any]) -> None:
    """The merge's log lines, from its caption_report.json."""
    edits = report["edits"]
    log.info(
        "merge %s: %d edits applied, %d stale, %d orphaned; %d captions (%d excluded)",
        name, edits["applied"], len(edits["stale"]), len(edits["orphaned"]),
        report["images"], len(report["excluded"]),
    )  # fmt: skip
    count = len(report["no_edit_row"])
    if count:
        have = "images have" if count > 1 else "image has"
        log.info("%d %s no edit row yet (make seed-edits DS=%s)", count, have, name)
