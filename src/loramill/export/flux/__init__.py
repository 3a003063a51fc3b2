"""Flux.1 and Chroma LoRAs in the layouts their clients load: kohya's BFL layout with fused
projections (``kohya``) and ComfyUI's and Forge's reading of both layouts (``client_rules``)."""
