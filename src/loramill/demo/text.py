"""The bundled text dataset: a station's maintenance procedures as question / response records.

Each answer follows from its question by fixed rules — isolate the unit the way its kind
requires, do the task's steps, sign the unit's log — so an adapter can learn them and a
held-out question shows whether it did. The prompt is the lora-scripts text format.

    python -m loramill.demo.text OUT_JSONL COUNT [SEED]
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

# unit kind → how it is made safe before work
ISOLATION = {
    "pump": "close the inlet valve and lock the breaker",
    "fan": "stop the fan and lock the breaker",
    "boiler": "shut the gas valve and wait for it to cool",
    "compressor": "vent the tank and lock the breaker",
}
# task → its steps
TASKS = {
    "replace the filter on": "remove the old filter, fit a new one",
    "inspect the belt of": "check the belt for cracks, set the tension",
    "clean": "brush the housing, wipe the sensors",
    "grease the bearings of": "wipe the nipples, add two shots of grease",
}
UNITS = [f"{kind} {n}" for kind in ISOLATION for n in range(1, 6)]
PROMPT = "### Question:\nHow do I {task} {unit}?\n\n### Response:\n"


def answer(task: str, unit: str) -> str:
    kind = unit.split()[0]
    return f"First {ISOLATION[kind]}. Then {TASKS[task]}. Sign the {unit} log."


def procedure_records(count: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` distinct records (at most every task × unit), in a seeded order."""
    pairs = [(task, unit) for task in TASKS for unit in UNITS]
    random.Random(seed).shuffle(pairs)
    return [
        {"prompt": PROMPT.format(task=task, unit=unit), "response": answer(task, unit)}
        for task, unit in pairs[:count]
    ]


def write_jsonl(records: list[dict[str, str]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


if __name__ == "__main__":
    out, count, *rest = sys.argv[1:]
    write_jsonl(procedure_records(int(count), int(rest[0]) if rest else 0), out)
