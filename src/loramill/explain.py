"""Why a stage is stale, in the user's terms: which setting, which files, which library."""

from __future__ import annotations

from typing import Any

# How a dataset folder's changes read, by the input that holds it.
FOLDER_WORDS = {"images": "images changed", "edits": "captions edited"}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", …" if len(names) > 3 else "")


def _folder_change(name: str, old: dict[str, str], new: dict[str, str]) -> str:
    changed = sum(1 for k in old.keys() & new.keys() if old[k] != new[k])
    counts = (changed, len(new.keys() - old.keys()), len(old.keys() - new.keys()))
    words = FOLDER_WORDS.get(name, f"{name} changed")
    if name == "edits":
        total = sum(counts)
        return f"{words} ({total} image{'s' if total > 1 else ''})"
    kinds = zip(counts, ("changed", "added", "removed"), strict=True)
    return f"{words} ({', '.join(f'{n} {what}' for n, what in kinds if n)})"


def _inputs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    reasons = []
    for name in _changed(old, new):
        before, after = old.get(name) or [], new.get(name) or []
        folders = [v for v in before + after if isinstance(v, dict)]
        if folders and len(before) <= 1 and len(after) <= 1:
            first = before[0] if before else {}
            last = after[0] if after else {}
            reasons.append(_folder_change(name, dict(first or {}), dict(last or {})))
        else:
            reasons.append(f"input {name} changed")
    return reasons


def explain(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Reasons a lock's components differ from today's, most telling first."""
    reasons = []
    keys = _changed(_flatten(old.get("params", {})), _flatten(new["params"]))
    if "base_model" in keys:  # its value is the model's fingerprint, not worth showing
        keys.remove("base_model")
        reasons.append("base model changed")
    if keys:
        reasons.append(f"config {_shown(keys)} changed")
    code = sorted({part.split(":")[0] for part in _changed(old.get("code", {}), new["code"])})
    if code:
        reasons.append(f"code changed ({_shown(code)})")
    was, now = old.get("software", {}), new["software"]
    packages = _changed(was, now)
    if packages:
        reasons.append(", ".join(f"{p} {was.get(p, '?')} → {now.get(p, '?')}" for p in packages))
    reasons += _inputs(old.get("inputs", {}), new["inputs"])
    return reasons or ["fingerprint changed"]
