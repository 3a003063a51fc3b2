"""Stand-ins for real data and models, built offline: the bundled image and text datasets
(``images``, ``text``), tiny diffusers and LLaMA models (``tiny_models``, ``tiny_sdxl``,
``tiny_llama``), full-size architectures' layer sizes (``full_size``), and image statistics
that tell how close generated images are to a dataset.

Imports the core package only; the stages never import it.
"""
