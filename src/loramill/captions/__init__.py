"""Captions: the auto-caption stage and its backends (``backends`` is the interface and
registry; ``sentences``, ``taggers`` the models), the per-image caption cache, human caption
edits (``edits``, ``seed_edits``), and their merge into training captions (``merge``,
``merge_rules``).

Imports the core package and ``loramill.models`` only.
"""
