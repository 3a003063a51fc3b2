"""LoRA+ (issue #31; kohya's loraplus_lr_ratio, loraplus_unet_lr_ratio,
loraplus_text_encoder_lr_ratio): each LoRA layer's up matrix learns at ratio × its
component's rate, read from the optimizer state a run saves."""

from __future__ import annotations

import json

import torch
from conftest import train, train_logged
from safetensors.torch import load_file

from loramill.export.metadata import kohya_metadata
from loramill.hashing import hash_value
from loramill.models.checkpoint import read_checkpoint

RANK = 4  # conftest's TRAIN_CONFIG: A is (rank, in, …), B is (out, rank, …)
RATES = {"unet_lr": 2e-4, "text_encoder_lr": 1e-4, "train_text_encoder": True}


def saved_groups(state_dir) -> list[tuple[float, list[torch.Size]]]:
    """Each parameter group of the newest saved optimizer state: its rate and the shapes of
    its parameters' first moments (AdamW's exp_avg, one per trained tensor)."""
    (path,) = (state_dir / "state").glob("step-*.pt")
    optimizer = torch.load(path, weights_only=True)["optimizer"]
    moments = optimizer["state"]
    return [
        (group["lr"], [moments[i]["exp_avg"].shape for i in group["params"]])
        for group in optimizer["param_groups"]
    ]


def test_up_matrices_learn_at_the_ratio_times_their_components_rate(
    prepared, tiny_sd, tmp_path, caplog
):
    config = {**RATES, "loraplus_lr_ratio": 16, "loraplus_text_encoder_lr_ratio": 4}
    config |= {"lr_scheduler": "constant"}
    written, _ = train_logged(
        prepared, tmp_path / "plus", tiny_sd, caplog, config, state_dir=tmp_path / "state"
    )
    groups = saved_groups(tmp_path / "state")
    # the UNet's down matrices and the rest, its up matrices; then the text encoder's
    assert [lr for lr, _ in groups] == [2e-4, 2e-4 * 16, 1e-4, 1e-4 * 4]
    for (_, down), (_, up) in (groups[0:2], groups[2:4]):
        assert len(down) == len(up) > 0
        assert all(s[0] == RANK for s in down) and all(s[1] == RANK for s in up)
    # the ratios reach the export's ss_network_args, as kohya's network arguments
    checkpoint = read_checkpoint(written[-1])
    args = json.loads(kohya_metadata(checkpoint, checkpoint.tensors, "x")["ss_network_args"])
    assert args == {"loraplus_lr_ratio": "16", "loraplus_text_encoder_lr_ratio": "4"}

    plain = tensors(train(prepared, tmp_path / "plain", tiny_sd, **RATES, lr_scheduler="constant"))
    assert tensors(written) != plain
    # at ratio 1 the groups split, nothing else changes: the plain run's adapter, bit for bit
    same = train(prepared, tmp_path / "one", tiny_sd, **RATES, lr_scheduler="constant",
                 loraplus_lr_ratio=1.0)  # fmt: skip
    assert tensors(same) == plain


def tensors(written) -> str:
    """The last checkpoint's tensors, by content (its metadata names the options)."""
    return hash_value({k: t.numpy().tobytes().hex() for k, t in load_file(written[-1]).items()})


def test_a_run_with_loraplus_and_block_rates_resumes_bit_identical(
    prepared, tiny_sd, tmp_path, caplog, monkeypatch
):
    """Killed in its fifth step and run again: the split groups' optimizer state and rates
    come back, and the adapter is the uninterrupted run's."""
    from conftest import crash_and_resume, digest

    config = {**RATES, "loraplus_unet_lr_ratio": 8, "up_lr_weight": "cosine+0.5"}
    resumed, lines = crash_and_resume(prepared, tmp_path, tiny_sd, caplog, monkeypatch, config)
    assert "resumed from step 4" in lines
    whole, _ = train_logged(prepared, tmp_path / "whole", tiny_sd, caplog, config)
    assert [digest(p) for p in resumed] == [digest(p) for p in whole]
