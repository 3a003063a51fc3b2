"""The X/Y/Z evaluation grid: which cells (``plan``), rendering them with the exported adapter
(``render``), composing pages (``layout``), and the grid job (``build``).

The top of the image chain. Imports the core package, ``loramill.reruns`` (the run-cache),
``loramill.models``, ``loramill.train`` (cached text embeddings) and ``loramill.export``.
"""
