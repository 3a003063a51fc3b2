"""Build the full-size Stable Diffusion 1.5 architecture with random weights, offline.

The layer sizes are SD1.5's (UNet 860 M, VAE 84 M, CLIP ViT-L/14 text encoder 123 M
parameters), so memory and step times measured with it are those of real training; the
weights are random because the real ones cannot be downloaded here. Saved as a diffusers
pipeline folder in float32 safetensors (about 4 GiB): keep it outside the repository.

    .venv/bin/python bench/build_sd15.py /tmp/sd15

Skips the build when OUT_DIR/model_index.json already exists.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from loramill.demo.full_size import SD15
from loramill.demo.tiny_models import sd_pipeline


def build_sd15(out_dir: str | Path, seed: int = 0) -> Path:
    """Build and save the pipeline in float32; returns ``out_dir``."""
    sd_pipeline(SD15, seed).save_pretrained(out_dir, safe_serialization=True)
    return Path(out_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if (args.out_dir / "model_index.json").exists():
        print(f"{args.out_dir}: already built")
        return 0
    start = time.perf_counter()
    build_sd15(args.out_dir, args.seed)
    size = sum(p.stat().st_size for p in args.out_dir.rglob("*") if p.is_file())
    print(f"{args.out_dir}: built in {time.perf_counter() - start:.0f} s, {size / 2**30:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
