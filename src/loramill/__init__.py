"""loramill: folders of images in, reproducible Stable Diffusion LoRA adapters out.

Modules are split by workflow stage (resize, caption, merge, train, export, grid); this
package import stays light so stages that need no torch start fast.
"""

__version__ = "0.1.0"


class LoramillError(Exception):
    """A problem with the user's input or configuration, reported as one line."""
