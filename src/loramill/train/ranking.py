"""The checkpoints a validation result ranks first (results/<ds>/validation.json, written by
loramill.train.validation): what ``export.checkpoint: best`` exports and ``grid.checkpoints:
best:N`` compares. Apart from the validate stage, so the export and the grid read the result
without depending on how it is measured.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from loramill import LoramillError


def read_result(path: str | os.PathLike) -> dict[str, Any]:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def best_checkpoint(result: dict[str, Any], average: bool = False) -> dict[str, Any]:
    """The checkpoint of lowest validation loss (of its moving average's with ``average``);
    the earlier step on a tie."""
    key = "ema_loss" if average else "loss"
    rows = [row for row in result["checkpoints"] if row.get(key) is not None]
    if not rows:
        raise LoramillError(f"validation: no checkpoint has a {key}")
    best = min(rows, key=lambda row: (row[key], row["step"]))
    return {"step": best["step"], "file": best["file"], "loss": best[key]}


def lowest_steps(result: dict[str, Any], count: int) -> list[int]:
    """The steps of the ``count`` lowest validation losses (grid.checkpoints best:N)."""
    rows = sorted(result["checkpoints"], key=lambda row: (row["loss"], row["step"]))
    return sorted(row["step"] for row in rows[:count])


def with_best_checkpoints(settings: dict[str, Any], result_json: str | None) -> dict[str, Any]:
    """Grid settings whose ``checkpoints: best:N`` is the list of those N steps."""
    selection = settings.get("checkpoints")
    if not (isinstance(selection, str) and selection.startswith("best:")):
        return settings
    if not result_json:
        raise LoramillError(f"grid.checkpoints: {selection} needs results/<ds>/validation.json")
    steps = lowest_steps(read_result(result_json), int(selection.removeprefix("best:")))
    return {**settings, "checkpoints": steps}
