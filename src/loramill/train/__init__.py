"""Training an image LoRA: the loop (``loop``), its options (``config``, ``optimizers``,
``caption_variation``), data and cached encodings (``data``, ``latents``), what a step
minimises (``objective``), state kept between runs (``state``, ``stopping``), what it shows
(``progress``, ``samples``), starting from an adapter (``init_from``) and several processes
(``distributed``).

Imports the core package, ``loramill.models``, ``loramill.prepare`` and ``loramill.captions``.
"""
