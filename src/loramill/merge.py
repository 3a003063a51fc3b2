"""Stage 3: merge human caption edits over auto captions into the training captions.

Human edits live in ``data/<ds>/captions/<image stem>.txt`` (kohya's sidecar convention, one
caption on one line). They are only ever read: edits are never overwritten. The trigger word
is prepended to every caption that does not already start with it.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any

from loramill import LoramillError
from loramill.dataset_files import entries
from loramill.files import read_jsonl, write_json, write_jsonl

log = logging.getLogger(__name__)


def read_human_caption(path: Path) -> str:
    """The caption in a sidecar file; errors name the file (and line)."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise LoramillError(f"{path}: not UTF-8 text (byte {error.start})") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), start=1)]
    lines = [(n, line) for n, line in lines if line]
    if not lines:
        raise LoramillError(f"{path}: empty caption (delete the file to use the auto caption)")
    if len(lines) > 1:
        raise LoramillError(f"{path}:{lines[1][0]}: a caption file holds one caption on one line")
    return lines[0][1]


def read_human_captions(captions_dir: str | os.PathLike | None) -> dict[str, str]:
    """Human captions by image stem; a missing folder means no edits."""
    if captions_dir is None or not Path(captions_dir).is_dir():
        return {}
    edits = (Path(entry.path) for entry in entries(captions_dir, "captions"))
    return {path.stem: read_human_caption(path) for path in edits}


def with_trigger(caption: str, trigger: str) -> str:
    if not trigger:
        return caption
    first = caption.split(",", 1)[0].strip().lower()
    if first == trigger.lower() or caption.lower().startswith(trigger.lower() + " "):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def tag_frequency(captions: list[str]) -> dict[str, int]:
    """Comma-separated tags counted over all captions (kohya's ss_tag_frequency)."""
    counts = Counter(tag.strip() for c in captions for tag in c.split(",") if tag.strip())
    return dict(sorted(counts.items()))


def merge_captions(
    auto_jsonl: str | os.PathLike,
    human_dir: str | os.PathLike | None,
    out_jsonl: str | os.PathLike,
    report_json: str | os.PathLike,
    trigger: str,
) -> dict[str, Any]:
    auto = read_jsonl(auto_jsonl)
    human = read_human_captions(human_dir)
    records, stems = [], set()
    for record in auto:
        stem = Path(record["image"]).stem
        stems.add(stem)
        edited = stem in human
        caption = human[stem] if edited else record["caption"]
        records.append(
            {
                "image": record["image"],
                "caption": with_trigger(caption, trigger),
                "source": "human" if edited else "auto",
            }
        )
    # An edit whose image is gone (or quarantined) is reported, never deleted.
    stale = sorted(f"{stem}.txt" for stem in human if stem not in stems)
    for name in stale:
        log.warning("caption edit %s has no usable image; it is ignored", name)
    records.sort(key=lambda r: r["image"])
    write_jsonl(out_jsonl, records)
    report = {
        "images": len(records),
        "human": sum(r["source"] == "human" for r in records),
        "auto": sum(r["source"] == "auto" for r in records),
        "stale_edits": stale,
        "tag_frequency": tag_frequency([r["caption"] for r in records]),
    }
    write_json(report_json, report)
    log.info("merged %(images)d captions: %(human)d human, %(auto)d auto", report)
    return report
