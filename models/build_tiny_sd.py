"""Rebuild the embedded tiny Stable Diffusion 1.x pipeline in models/tiny-sd.

    python models/build_tiny_sd.py [OUT_DIR]

Deterministic: the same package versions give byte-identical files (tests check the
committed copy against a fresh build). Needs `open-clip-torch` installed with --no-deps for the
real CLIP BPE vocabulary; nothing is downloaded.
"""

import sys
from pathlib import Path

from loramill.tiny_models import build_tiny_sd

if __name__ == "__main__":
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "tiny-sd"
    build_tiny_sd(out)
    print(f"wrote {out}")
