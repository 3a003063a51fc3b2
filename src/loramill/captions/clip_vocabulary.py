"""The ``clip`` captioner's shipped vocabulary: terms by category, in caption order.

A caption lists, category by category, the terms CLIP scores highest for the image (at most
``caption.top_k`` per category, each above ``caption.threshold``). Replace it with
``caption.vocabulary`` (a mapping of category → terms) to label in a domain's own words.
"""

from __future__ import annotations

DEFAULT_VOCABULARY: dict[str, list[str]] = {
    "subject": [
        "a person", "a portrait", "a group of people", "an animal", "a cat", "a dog", "a bird",
        "a building", "a street", "a room", "a landscape", "a forest", "mountains", "the sea",
        "a city", "a car", "food", "flowers", "a plant", "an object", "text", "a pattern",
        "abstract shapes",
    ],
    "style": [
        "a photograph", "a painting", "a watercolor", "a drawing", "a sketch", "an illustration",
        "anime", "a 3d render", "pixel art", "a comic", "a poster", "line art",
    ],
    "lighting": [
        "daylight", "golden hour", "night", "studio lighting", "soft light", "backlight",
        "neon light", "overcast", "dramatic lighting",
    ],
    "material": [
        "wood", "metal", "glass", "stone", "fabric", "paper", "plastic", "leather", "water",
        "concrete",
    ],
}  # fmt: skip
