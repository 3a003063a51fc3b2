"""The embedded tiny model: small, real CLIP tokenizer, and exactly what its script builds."""

from __future__ import annotations

import filecmp

from conftest import REPO, TINY_SD, run_tool

from loramill.hashing import tree_files
from loramill.tiny_models import build_clip_tokenizer


def test_committed_model_is_small():
    assert sum(p.stat().st_size for p in tree_files(TINY_SD)) <= 10 * 1024 * 1024


def test_real_clip_tokenizer():
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]


def test_build_script_reproduces_the_committed_model_byte_for_byte(tmp_path):
    # The README's command itself.
    script = REPO / "models" / "build_tiny_sd.py"
    run_tool("python", str(script), str(tmp_path / "tiny-sd"), cwd=tmp_path)
    committed = [p.relative_to(TINY_SD) for p in tree_files(TINY_SD)]
    rebuilt = [p.relative_to(tmp_path / "tiny-sd") for p in tree_files(tmp_path / "tiny-sd")]
    assert committed == rebuilt
    _, mismatch, errors = filecmp.cmpfiles(TINY_SD, tmp_path / "tiny-sd", committed, shallow=False)
    assert (mismatch, errors) == ([], [])


def test_sd_layout_and_vae_scale_factor(tiny_sd):
    from loramill.model import load_pipeline

    pipe = load_pipeline(tiny_sd)
    assert pipe.vae_scale_factor == 8
    names = {n for n, _ in pipe.unet.named_modules()}
    for block in (
        "down_blocks.0.attentions.0",
        "mid_block.attentions.0",
        "up_blocks.1.attentions.0",
    ):
        assert f"{block}.transformer_blocks.0.attn2.to_k" in names
