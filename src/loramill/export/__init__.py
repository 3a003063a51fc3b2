"""Exports: a trained checkpoint written as the files users load (``write``: kohya and
diffusers naming), each reloaded the way its clients load it (``verify``, ``client_rules``,
``ldm_names`` for AUTOMATIC1111/ComfyUI's LDM names), and the model card.

Imports the core package, ``loramill.models`` and ``loramill.train`` (a run's options).
"""
