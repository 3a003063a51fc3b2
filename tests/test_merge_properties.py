"""Properties of the merge, for any captions and edits hypothesis can make up: deterministic,
idempotent, and every edit's text lands exactly where its mode says."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from loramill.captions.edits import MODES, Edit
from loramill.captions.merge_rules import Rules, clean_tags, normalise, training_caption
from loramill.train.caption_variation import CaptionVariation
from loramill.train.config import TrainConfig


def variation_of(**options) -> CaptionVariation:
    return CaptionVariation(TrainConfig(**options))


# Tags as people and taggers write them: words, spaces, underscores, a little punctuation;
# no commas inside a tag (commas separate tags).
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_^ ", min_size=1, max_size=12)
TAG = WORD.map(lambda t: " ".join(t.split())).filter(bool)
CAPTION = st.lists(TAG, max_size=6).map(", ".join)
RULES = st.builds(
    Rules,
    trigger_words=st.lists(TAG, max_size=2).map(tuple),
    remove_tags=st.frozensets(TAG.map(str.casefold), max_size=2),
    dedupe_tags=st.booleans(),
    underscores_to_spaces=st.booleans(),
)
EDIT = st.builds(
    Edit,
    text=CAPTION.filter(bool),
    mode=st.sampled_from(MODES),
    image_sha256=st.just(""),
    origin=st.just("metadata.csv:2"),
)


@settings(max_examples=300, deadline=None)
@given(auto=CAPTION, edit=st.none() | EDIT, rules=RULES)
def test_merge_is_deterministic_and_idempotent(auto, edit, rules):
    once = training_caption(auto, edit, rules)
    assert once == training_caption(auto, edit, rules)
    if once is not None:  # merging the result again changes nothing
        assert training_caption(once, None, rules) == once


@settings(max_examples=300, deadline=None)
@given(auto=CAPTION, edit=EDIT)
def test_every_edit_lands_as_its_mode_says(auto, edit):
    rules = Rules(dedupe_tags=False, underscores_to_spaces=False)  # no cleanup, no triggers
    result = training_caption(auto, edit, rules)
    text, base = normalise(edit.text), normalise(auto)
    if edit.mode == "exclude":
        assert result is None
    elif edit.mode == "replace" or not base:
        assert result == text
    elif edit.mode == "prepend":
        assert result == f"{text}, {base}"
    else:
        assert result == f"{base}, {text}"


@settings(max_examples=200, deadline=None)
@given(caption=CAPTION, rules=RULES)
def test_cleanup_keeps_order_and_never_adds_tags(caption, rules):
    tags = clean_tags(caption, rules)
    assert len(tags) <= len([t for t in caption.split(",") if t.strip()])
    if rules.dedupe_tags:
        assert len({t.casefold() for t in tags}) == len(tags)
    triggers = {w.casefold() for w in rules.trigger_words}  # never removed
    assert not any(t.casefold() in rules.remove_tags - triggers for t in tags)


# --- captions at training time ----------------------------------------------------------------

TAGS = st.lists(TAG.filter(lambda t: "," not in t), min_size=0, max_size=8)


@settings(max_examples=300, deadline=None)
@given(
    tags=TAGS, keep=st.integers(0, 4), seed=st.integers(0, 2**31), rate=st.sampled_from([0.0, 0.5])
)
def test_shuffle_keeps_the_first_keep_tokens_tags_in_place(tags, keep, seed, rate):
    variation = variation_of(shuffle_caption=True, keep_tokens=keep, caption_tag_dropout_rate=rate)
    caption = ", ".join(tags)
    drawn = variation.draw(caption, torch.Generator().manual_seed(seed))
    out = [t.strip() for t in drawn.split(",") if t.strip()]
    assert out[:keep] == tags[:keep]
    rest = out[keep:]
    assert all(t in tags[keep:] for t in rest)  # only the free tags move or go
    if rate == 0.0:
        assert sorted(rest) == sorted(tags[keep:])
    assert drawn == variation.draw(caption, torch.Generator().manual_seed(seed))
