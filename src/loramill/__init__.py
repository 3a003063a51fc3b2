"""loramill: folders of images in, reproducible Stable Diffusion LoRA adapters out.

The core, here: config, files (atomic writes, path safety), hashing, dataset files, model
files and the params fingerprinted by content, devices, software versions, publishing and
report pages. One subpackage per part of the product, each saying what it owns and what it may
import: ``reruns`` (what must run), ``prepare``, ``captions``, ``train``, ``models``,
``export``, ``grid``, ``text``, ``demo``. Core modules import no subpackage except
``content_params`` (its table names the model-file functions) and ``workflow_config`` (the
parse-time config checks, which ask each room's). This import stays light so stages that need
no torch start fast.
"""

__version__ = "0.1.0"


class LoramillError(Exception):
    """A problem with the user's input or configuration, reported as one line."""
