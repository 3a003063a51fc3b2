"""The Flux family (FLUX.1 [dev] and [schnell], Chroma): its code (``family``), its latents
(``latents``), its LoRA modules in kohya's and diffusers' layouts (``layout``) and which base a
folder holds (``detect``). ``layout`` and ``detect`` are free of torch (parse time)."""
