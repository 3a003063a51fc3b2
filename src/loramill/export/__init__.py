"""Exports: a trained checkpoint written as the files users load (``write``: kohya and
diffusers naming, ``kohya_naming`` for each family's kohya names, ``metadata`` for the
``ss_*`` / ``modelspec.*`` fields), each reloaded the way its clients load it (``verify``,
``client_rules``, ``ldm_names`` and ``sdxl_layout`` for AUTOMATIC1111/ComfyUI's LDM names),
the LDM single-file layout (``ldm_checkpoint``), and the model card. Flux.1 and Chroma:
``flux`` (kohya's BFL layout, ComfyUI's rules, the files and their verification).

Imports the core package, ``loramill.models`` and ``loramill.train`` (a run's options).
"""
