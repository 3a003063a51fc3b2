"""Flux.1 and Chroma LoRAs in the layouts their clients load: kohya's BFL layout with fused
projections (``kohya``), ComfyUI's and Forge's reading of both layouts (``client_rules``), the
export's files (``write``) and their verification in every client (``verify``)."""
