"""The models a run trains on and the network it trains: loading the base model
(``base_model``, ``single_file`` for A1111/ComfyUI checkpoints; ``families``, free of torch,
says which family a folder holds), the LoRA network (``network``; its kinds, free of torch,
in ``network_targets``), the training checkpoint format (``checkpoint``), module names in
kohya's and diffusers' spelling, and samplers by kohya's names.

Imports the core package only.
"""
