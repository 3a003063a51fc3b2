"""Do loramill's exports load on an older stack? (issue #13)

Exports a LoRA (random weights, network kohya_conv, UNet and text encoder, rank 4 / alpha 2,
conv rank 2 / alpha 2) on the embedded model's architecture with this project's pinned stack,
then loads both files — the kohya file and the diffusers file — with diffusers'
load_lora_weights in a scratch venv holding an older stack (by default transformers 4.57,
diffusers 0.39, peft 0.20, what users on transformers 4 get), and for comparison in this
project's own venv. Each load must put every module of the file in place, text encoder
included, at the file's alpha / rank scaling. Exits 1 when one does not.

The base is built in each venv from models/tiny-sd's configs with random weights (the
embedded weights were saved by transformers 5, whose CLIP key layout transformers 4 does not
read; that is the base model's portability, not the LoRA's).

    .venv/bin/python bench/compat_stack.py --venv /tmp/oldstack --workdir /tmp/lm-compat \
        [--transformers 4.57.6] [--diffusers 0.39.0] [--peft 0.20.0]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "models" / "tiny-sd"
# Runs inside either venv: diffusers, transformers and peft only, no loramill.
LOADER = r"""
import json, sys
from diffusers import (AutoencoderKL, PNDMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from peft.utils import get_peft_model_state_dict
from transformers import CLIPTextConfig, CLIPTextModel
import diffusers, peft, transformers

base, files = sys.argv[1], sys.argv[2:]
pipe = StableDiffusionPipeline(
    vae=AutoencoderKL.from_config(AutoencoderKL.load_config(f"{base}/vae")),
    text_encoder=CLIPTextModel(CLIPTextConfig.from_pretrained(f"{base}/text_encoder")),
    tokenizer=None,  # loading a LoRA needs none (and transformers 5 saved this one)
    unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(f"{base}/unet")),
    scheduler=PNDMScheduler.from_pretrained(f"{base}/scheduler"),
    safety_checker=None, feature_extractor=None, requires_safety_checker=False,
)
result = {"versions": {m.__name__: m.__version__ for m in (transformers, diffusers, peft)}}
for n, path in enumerate(files):
    name = f"a{n}"
    try:
        folder, _, file = path.rpartition("/")  # as the README loads it: folder + weight_name
        pipe.load_lora_weights(folder, weight_name=file, adapter_name=name)
    except Exception as error:
        result[path] = {"error": f"{type(error).__name__}: {error}"[:300]}
        continue
    entry = {}
    for component in ("unet", "text_encoder"):
        model = getattr(pipe, component)
        scalings = sorted({m.scaling[name] for m in model.modules()
                           if name in getattr(m, "scaling", {})})
        tensors = get_peft_model_state_dict(model, adapter_name=name)
        entry[component] = {"modules": len(tensors) // 2, "scalings": scalings}
    result[path] = entry
    pipe.delete_adapters(name)
print(json.dumps(result))
"""


def make_exports(workdir: Path) -> tuple[list[Path], dict]:
    """Both export files of one random checkpoint, and what a full load must show."""
    import torch

    from loramill.export.write import export_adapter
    from loramill.models.base_model import load_pipeline
    from loramill.models.checkpoint import (
        read_checkpoint,
        save_checkpoint,
        step_metadata,
        step_name,
    )
    from loramill.models.network import NetworkSpec, add_lora

    pipe = load_pipeline(str(BASE))
    torch.manual_seed(0)
    spec = NetworkSpec("kohya_conv", 4, 2.0, conv_rank=2, conv_alpha=2.0)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    add_lora(models, spec, init=False)
    checkpoint = workdir / step_name(1)
    provenance = json.dumps({"base_model": str(BASE), "seed": 0})
    metadata = step_metadata(1, provenance)
    save_checkpoint(checkpoint, models, metadata)
    files = [workdir / "compat.safetensors", workdir / "compat.diffusers.safetensors"]
    export_adapter(checkpoint, *files, "compat")
    modules = {c: len(read_checkpoint(checkpoint).component(c)) // 2
               for c in ("unet", "text_encoder")}  # fmt: skip
    # kohya file: alpha / rank, 2/4 for Linear modules (and the text encoder), 2/2 for 3×3
    # convs; diffusers file: alpha = rank everywhere (the trained scale is in its weights)
    scalings = {"unet": [0.5, 1.0], "text_encoder": [0.5]}
    by_file = {files[0].name: scalings, files[1].name: {"unet": [1.0], "text_encoder": [1.0]}}
    return files, {"modules": modules, "scalings": by_file}


def ensure_venv(venv: Path, args: argparse.Namespace) -> None:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    from loramill.software import LIBRARIES

    # the libraries that matter (loramill.software), at the older versions asked for; torch
    # stays pinned, the rest come at what pip picks for them
    older = {"transformers": args.transformers, "diffusers": args.diffusers, "peft": args.peft}
    pins = [f"{n}=={older[n]}" if n in older else n for n in LIBRARIES if n != "torch"]
    # torch first, pinned, so nothing pulls in a CUDA build
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    constraint = venv / "torch-pin.txt"
    constraint.write_text("torch==2.13.0\n")
    subprocess.run([*pip, "-c", str(constraint), *pins], check=True)


def load_in(python: Path, files: list[Path]) -> dict:
    result = subprocess.run(
        [str(python), "-c", LOADER, str(BASE), *map(str, files)],
        capture_output=True, text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    if result.returncode:
        sys.exit(f"{python}: the loader failed:\n{result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--venv", type=Path, required=True, help="the older stack's venv")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--transformers", default="4.57.6")
    parser.add_argument("--diffusers", default="0.39.0")
    parser.add_argument("--peft", default="0.20.0")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    ensure_venv(args.venv, args)
    files, want = make_exports(args.workdir)
    ok = True
    for python in (args.venv / "bin" / "python", Path(sys.executable)):
        result = load_in(python, files)
        stack = ", ".join(f"{k} {v}" for k, v in result.pop("versions").items())
        for path, got in result.items():
            full = "error" not in got and all(
                got[c]["modules"] == want["modules"][c] for c in ("unet", "text_encoder")
            )
            scaled = full and all(
                got[c]["scalings"] == want["scalings"][Path(path).name][c]
                for c in ("unet", "text_encoder")
            )
            ok &= full and scaled
            print(f"{stack} | {Path(path).name} | {json.dumps(got)} | "
                  f"{'loads fully' if full and scaled else 'FAILS'}")  # fmt: skip
    print(f"expected: {json.dumps(want)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
