"""How a training caption is made from an auto caption and a human edit, in this order:

1. **Edit mode** (loramill.captions.edits): ``replace`` takes the edit, ``prepend`` puts it
   before the auto caption and ``append`` after it (joined with ", "), ``exclude`` drops the
   image from training; no edit keeps the auto caption.
2. **Tag cleanup**, tag by tag (tags are the comma-separated parts): underscores become
   spaces in single-word tags (``long_hair`` → ``long hair``; emoticons such as ``^_^`` stay),
   ``merge.replace_tags`` renames tags, ``merge.remove_tags`` drops them, and with
   ``merge.dedupe_tags`` a repeated tag keeps its first place only. Matching ignores case.
   Trigger words are never rewritten or removed.
3. **Trigger words** (the dataset's ``trigger``: one word or a list): each one the caption
   does not already hold as a tag (or open with) is put in front, once, in the order given.
4. **Normalisation**: runs of whitespace become one space, no space before , . ; : ! ?,
   empty tags and repeated commas disappear, no leading or trailing separators.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from loramill.captions.edits import Edit

SPACE_BEFORE_PUNCTUATION = re.compile(r"\s+([,.;:!?])")


@dataclass(frozen=True)
class Rules:
    trigger_words: tuple[str, ...] = ()
    remove_tags: frozenset[str] = frozenset()
    replace_tags: dict[str, str] = field(default_factory=dict)
    dedupe_tags: bool = True
    underscores_to_spaces: bool = True

    @classmethod
    def from_config(cls, merge: dict[str, Any], trigger_words: list[str]) -> Rules:
        return cls(
            trigger_words=tuple(w.strip() for w in trigger_words if w.strip()),
            remove_tags=frozenset(t.strip().casefold() for t in merge.get("remove_tags", [])),
            replace_tags={
                k.strip().casefold(): v.strip() for k, v in merge.get("replace_tags", {}).items()
            },
            dedupe_tags=merge.get("dedupe_tags", True),
            underscores_to_spaces=merge.get("underscores_to_spaces", True),
        )


def apply_edit(auto: str, edit: Edit | None) -> str | None:
    """Step 1: the caption before cleanup, or None when the edit excludes the image."""
    if edit is None:
        return auto
    if edit.mode == "exclude":
        return None
    if edit.mode == "replace" or not auto:
        return edit.text
    return f"{edit.text}, {auto}" if edit.mode == "prepend" else f"{auto}, {edit.text}"


def clean_tags(caption: str, rules: Rules) -> list[str]:
    """Step 2: the caption's tags after cleanup."""
    kept: list[str] = []
    seen: set[str] = set()
    triggers = {word.casefold() for word in rules.trigger_words}
    for part in caption.split(","):
        tag = " ".join(part.split())
        if tag.casefold() not in triggers:  # a trigger word is never rewritten
            if rules.underscores_to_spaces and " " not in tag and len(tag) > 3:
                tag = " ".join(tag.replace("_", " ").split())
            tag = rules.replace_tags.get(tag.casefold(), tag)
        key = tag.casefold()
        removed = key in rules.remove_tags and key not in triggers
        if not tag or removed or (rules.dedupe_tags and key in seen):
            continue
        seen.add(key)
        kept.append(tag)
    return kept


def with_triggers(tags: list[str], rules: Rules) -> list[str]:
    """Step 3: trigger words the caption lacks, in front, once. A word opening the caption
    ("wband style bands") counts as present."""
    present = {tag.casefold() for tag in tags}
    opening = tags[0].casefold() if tags else ""
    missing = [
        word
        for word in dict.fromkeys(rules.trigger_words)
        if word.casefold() not in present and not opening.startswith(word.casefold() + " ")
    ]
    return missing + tags


def normalise(text: str) -> str:
    """Step 4."""
    text = SPACE_BEFORE_PUNCTUATION.sub(r"\1", " ".join(text.split()))
    text = re.sub(r",(\s*,)+", ",", text)
    return text.strip(" ,;")


def training_caption(auto: str, edit: Edit | None, rules: Rules) -> str | None:
    """Steps 1–4; None for an excluded image."""
    caption = apply_edit(auto, edit)
    if caption is None:
        return None
    return normalise(", ".join(with_triggers(clean_tags(caption, rules), rules)))
