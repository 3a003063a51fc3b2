"""kohya sd-scripts' train_network.py with per-step timers, for bench/vs_kohya.py.

Runs with kohya's own Python environment (not loramill's), from vs_kohya.py:

    <kohya venv>/bin/python bench/kohya_runner.py <sd-scripts dir> <train_network.py args...>

kohya's code runs unchanged. Two things are added in this process only:
- A torchvision stand-in. PyPI's torchvision is a CUDA build that does not import beside CPU
  torch, and train_network.py's import path needs `torchvision.transforms` for three names only:
  Compose, ToTensor and Normalize (library/train_util.py, used to turn images into tensors
  before their latents are cached). They are given torchvision's semantics here, in memory:
  no file on a path, so transformers and diffusers still see no torchvision.
- Timers. The step is timed from kohya's own hook `on_step_start` (before the text encoder and
  the UNet forward) to `sample_images(epoch=None)`, which kohya calls after the optimizer step,
  the scheduler step and zero_grad. The text encoder's forward is timed apart
  (`SdTextEncodingStrategy.encode_tokens`): kohya runs it every step for SD1.x, where loramill
  reads cached embeddings.

Prints one line `RESULT {"steps": [...], "text_encoder": [...]}` (seconds per step) at the end.
With PROFILE_STEP=n and PROFILE_OUT=path in the environment, step n runs under torch.profiler
(bench/step_profile.py) and its report goes to that path.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import sys
import time
import types

RESULT = "RESULT "


def install_torchvision_stand_in() -> None:
    import numpy as np
    import torch

    class Compose:
        def __init__(self, transforms: list) -> None:
            self.transforms = transforms

        def __call__(self, value):
            for transform in self.transforms:
                value = transform(value)
            return value

    class ToTensor:
        """HWC uint8 array or PIL image -> CHW float tensor in [0, 1] (other dtypes unscaled)."""

        def __call__(self, picture):
            array = np.array(picture) if not isinstance(picture, np.ndarray) else picture
            if array.ndim == 2:
                array = array[:, :, None]
            tensor = torch.from_numpy(array.transpose(2, 0, 1)).contiguous()
            if tensor.dtype == torch.uint8:
                return tensor.to(torch.get_default_dtype()).div(255)
            return tensor

    class Normalize:
        def __init__(self, mean: list[float], std: list[float]) -> None:
            self.mean, self.std = mean, std

        def __call__(self, tensor):
            mean = torch.as_tensor(self.mean, dtype=tensor.dtype)[:, None, None]
            std = torch.as_tensor(self.std, dtype=tensor.dtype)[:, None, None]
            return (tensor - mean) / std

    def unavailable(*_args, **_kwargs):
        raise NotImplementedError("not in bench/kohya_runner.py's torchvision stand-in")

    modules = {}
    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional"):
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        modules[name] = module
    transforms = modules["torchvision.transforms"]
    transforms.Compose, transforms.ToTensor, transforms.Normalize = Compose, ToTensor, Normalize
    transforms.functional = modules["torchvision.transforms.functional"]
    transforms.functional.pil_to_tensor = unavailable
    transforms.functional.gaussian_blur = unavailable
    modules["torchvision"].transforms = transforms
    sys.modules.update(modules)


def main() -> int:
    sd_scripts, argv = sys.argv[1], sys.argv[2:]
    install_torchvision_stand_in()
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # step_profile
    sys.path.insert(0, sd_scripts)
    import train_network
    from library import strategy_sd, train_util

    steps: list[float] = []
    text_encoder: list[float] = []
    encode_tokens = strategy_sd.SdTextEncodingStrategy.encode_tokens

    def timed_encode_tokens(self, *args, **kwargs):
        start = time.perf_counter()
        result = encode_tokens(self, *args, **kwargs)
        text_encoder.append(time.perf_counter() - start)
        return result

    strategy_sd.SdTextEncodingStrategy.encode_tokens = timed_encode_tokens

    class TimedTrainer(train_network.NetworkTrainer):
        started: float | None = None
        profiled = None

        def on_step_start(self, args, accelerator, network, text_encoders, unet, *rest, **kw):
            if kw.get("is_train", True):
                if len(steps) + 1 == int(os.environ.get("PROFILE_STEP", 0)):
                    from step_profile import StepProfile

                    self.profiled = StepProfile(unet, os.environ["PROFILE_OUT"], "kohya")
                    self.profiled.start()
                self.started = time.perf_counter()
            return super().on_step_start(
                args, accelerator, network, text_encoders, unet, *rest, **kw
            )

        def sample_images(self, accelerator, args, epoch, global_step, *rest):
            result = super().sample_images(accelerator, args, epoch, global_step, *rest)
            if epoch is None and self.started is not None:  # the call after a training step
                steps.append(time.perf_counter() - self.started)
                self.started = None
                if self.profiled:
                    self.profiled.stop()
                    self.profiled = None
            return result

    parser = train_network.setup_parser()
    args = parser.parse_args(argv)
    train_util.verify_command_line_training_args(args)
    args = train_util.read_config_from_file(args, parser)
    TimedTrainer().train(args)
    print(RESULT + json.dumps({"steps": steps, "text_encoder": text_encoder}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
