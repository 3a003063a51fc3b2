#!/usr/bin/env bash
# kohya sd-scripts' own Python environment, for bench/vs_kohya.py (it cannot share loramill's:
# kohya pins transformers 4 and diffusers 0.32). DIR/sd-scripts must hold a checkout of
# kohya-ss/sd-scripts (measured: commit 48d368fa); this makes DIR/venv beside it.
#
#   bench/kohya_env.sh /work/kohya
#
# Torch is pinned as everywhere here (CPU wheel); the rest are kohya's requirements.txt pins
# that train_network.py's import path needs for AdamW on SD1.x, with OpenCV's headless wheel.
# torchvision is left out: bench/kohya_runner.py stands in for the three names kohya uses.
set -euo pipefail
dir=${1:?usage: bench/kohya_env.sh DIR (with DIR/sd-scripts a kohya sd-scripts checkout)}
test -f "$dir/sd-scripts/train_network.py" || {
    echo "no $dir/sd-scripts/train_network.py: put a kohya-ss/sd-scripts checkout there" >&2
    exit 2
}
python3.11 -m venv "$dir/venv"
"$dir/venv/bin/pip" install --quiet torch==2.13.0
"$dir/venv/bin/pip" install --quiet -c <(echo torch==2.13.0) \
    accelerate==1.6.0 transformers==4.54.1 diffusers==0.32.1 ftfy==6.3.1 \
    opencv-python-headless==4.10.0.84 einops==0.7.0 safetensors==0.4.5 toml==0.10.2 \
    voluptuous==0.15.2 huggingface-hub==0.34.3 imagesize==1.4.1 rich==14.1.0 'numpy<2.3' \
    pillow tqdm
echo "kohya environment: $dir/venv/bin/python"
