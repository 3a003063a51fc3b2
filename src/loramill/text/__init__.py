"""Text LoRA: jsonl records (``records``), the prepare / train / evaluate / export stages, the
language model (``language_model``) and GGUF files for llama.cpp (``gguf``).

Imports the core package, ``loramill.models`` and ``loramill.train`` (options, progress,
state); nothing of the image chain imports it.
"""
