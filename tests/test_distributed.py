"""Data-parallel training of one dataset (issue #16): two gloo processes of batch 1 on the CPU
train as one process of batch 2 does, only rank 0 writes, and a stopped run resumes exactly."""

from __future__ import annotations

import pytest
import torch
from conftest import train
from safetensors.torch import load_file

from loramill.distributed import share

FAST = {"max_train_steps": 4, "save_steps": 2, "threads": 1}


def tensors(paths):
    return [load_file(str(p)) for p in paths]


def test_the_rows_each_process_trains_on():
    assert [share(2, r, 2) for r in (0, 1)] == [(slice(0, 1), 1.0), (slice(1, 2), 1.0)]
    # 3 rows over 2 processes: 1 and 2 rows, weighted to the batch's mean
    assert [share(3, r, 2) for r in (0, 1)] == [(slice(0, 1), 2 / 3), (slice(1, 3), 4 / 3)]
    # a short batch: rank 0 runs row 0 for DDP's sake and contributes nothing, rank 1 it all
    assert [share(1, r, 2) for r in (0, 1)] == [(slice(0, 1), 0.0), (slice(0, 1), 2.0)]
    assert share(5, 0, 1) == (slice(0, 5), 1.0)


def test_two_processes_of_batch_1_train_as_one_process_of_batch_2(prepared, tmp_path, tiny_sd):
    one = train(prepared, tmp_path / "one", tiny_sd, train_batch_size=2, **FAST)
    two = train(prepared, tmp_path / "two", tiny_sd, train_batch_size=1, num_processes=2, **FAST)
    names = ["step-000002.safetensors", "step-000004.safetensors"]
    assert [p.name for p in two] == [p.name for p in one] == names
    # only rank 0 wrote: the checkpoints and nothing else
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == [
        p.name for p in two
    ]
    for a, b in zip(tensors(one), tensors(two), strict=True):
        assert a.keys() == b.keys()
        # gradients summed in another order, then through Adam (which evens out magnitudes):
        # measured 7e-6 apart at most, updates of up to 4e-3
        for key in a:
            assert torch.allclose(a[key], b[key], rtol=1e-4, atol=2e-5), key
    moved = max(float((b[k] - a[k]).abs().max()) for a, b in zip(tensors(one)[:1],
                tensors(one)[1:], strict=True) for k in a)  # fmt: skip
    assert moved > 1e-4  # the comparison is of weights that trained


def test_a_stopped_two_process_run_resumes_exactly(prepared, tmp_path, tiny_sd):
    state = tmp_path / "state"
    config = {**FAST, "train_batch_size": 1, "num_processes": 2}
    first = train(prepared, tmp_path / "a", tiny_sd, call={"state_dir": state},
                  **{**config, "max_train_steps": 2})  # fmt: skip
    assert [p.name for p in first] == ["step-000002.safetensors"]
    resumed = train(prepared, tmp_path / "b", tiny_sd, call={"state_dir": state}, **config)
    straight = train(prepared, tmp_path / "c", tiny_sd, **config)
    for a, b in zip(tensors(resumed), tensors(straight), strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_workers_error_is_the_jobs_one_line_error(prepared, tmp_path, tiny_sd):
    from loramill import LoramillError

    with pytest.raises(LoramillError, match=r"^train\.optimizer_type: AdamW8bit .* needs a CUDA"):
        train(prepared, tmp_path / "x", tiny_sd, train_batch_size=1, num_processes=2,
              optimizer_type="AdamW8bit", call={"device": "cpu"}, **FAST)  # fmt: skip
    assert not (tmp_path / "x" / "checkpoints").exists()
