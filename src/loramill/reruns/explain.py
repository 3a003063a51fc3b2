"""Why a stage is stale, in the user's terms: which setting, which files, which library."""

from __future__ import annotations

from typing import Any

from loramill.content_params import BY_CONTENT

# How a dataset folder's changes read, by the input that holds it.
FOLDER_WORDS = {"images": "images changed"}
# The inputs that hold human caption edits (rules/prepare.smk): the sidecars of captions/,
# recorded per file, and metadata.csv, recorded per image's row (loramill.captions.edits).
EDIT_INPUTS = ("edits", "metadata")


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


def _entries(name: str, value: Any) -> dict[str, str] | None:
    """An input's per-entry hashes (a folder's files, metadata.csv's rows); {} when absent,
    None when it is recorded as a whole (a produced file, or a lock from before)."""
    values = value or []
    if not values:
        return {}
    if len(values) != 1 or not isinstance(values[0], dict):
        return None
    return values[0].get("rows") if name == "metadata" else values[0]


def _counts(old: dict[str, str], new: dict[str, str]) -> tuple[int, int, int]:
    """How many entries changed, were added and were removed."""
    changed = sum(1 for k in old.keys() & new.keys() if old[k] != new[k])
    return changed, len(new.keys() - old.keys()), len(old.keys() - new.keys())


def _inputs(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    reasons: list[str] = []
    edited, edits_at = 0, None  # edits in both places read as one reason
    for name in _changed(old, new):
        before, after = _entries(name, old.get(name)), _entries(name, new.get(name))
        if before is None or after is None:
            reasons.append(f"input {name} changed")
        elif name in EDIT_INPUTS:
            edits_at = len(reasons) if edits_at is None else edits_at
            count = sum(_counts(before, after))
            edited += count
            if not count:  # only metadata.csv's header, byte-order mark or line endings
                reasons.append("metadata.csv changed (no image's edit)")
        else:
            counts = zip(_counts(before, after), ("changed", "added", "removed"), strict=True)
            listed = ", ".join(f"{n} {what}" for n, what in counts if n)
            words = FOLDER_WORDS.get(name, f"{name} changed")
            reasons.append(f"{words} ({listed})" if listed else f"input {name} changed")
    if edited:
        reasons.insert(edits_at or 0, f"captions edited ({edited} image{'s' * (edited > 1)})")
    return reasons


def _placed(components: dict[str, Any]) -> dict[str, str]:
    """Code parts by where they live (a lock from before places were kept: by their key)."""
    where = components.get("code_where", {})
    return {where.get(key, key): digest for key, digest in components.get("code", {}).items()}


def explain(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Reasons a lock's components differ from today's, most telling first."""
    reasons = []
    keys = _changed(_flatten(old.get("params", {})), _flatten(new["params"]))
    for key in [k for k in keys if k in BY_CONTENT]:  # a content hash, not worth showing
        keys.remove(key)
        reasons.append(f"{key.replace('_', ' ')} changed")
    if keys:
        reasons.append(f"config {_shown(keys)} changed")
    changed = _changed(_placed(old), _placed(new))  # by place: keys are in order reached
    code = sorted({place.split(":")[0] for place in changed})
    if code:
        reasons.append(f"code changed ({_shown(code)})")
    was, now = old.get("software", {}), new["software"]
    packages = _changed(was, now)
    if packages:
        reasons.append(", ".join(f"{p} {was.get(p, '?')} → {now.get(p, '?')}" for p in packages))
    reasons += _inputs(old.get("inputs", {}), new["inputs"])
    return reasons or ["fingerprint changed"]
