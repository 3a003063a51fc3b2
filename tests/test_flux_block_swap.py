"""kohya's blocks_to_swap for Flux (loramill.models.block_swap, issue #30): the frozen weights
of the transformer's last blocks wait in host memory and are copied in for each use. What a
user relies on: kohya's count, the same adapter as without swapping, every swapped block
computed on a copy brought in for it (the GPU's rule: on the CPU the host copy would compute
too, so the tests check which tensor each Linear reads), one block's copies held at a time,
and one-line refusals where it cannot work."""

from __future__ import annotations

import pytest
import torch
from conftest import digest, train_logged

from loramill import LoramillError
from loramill.demo.tiny_flux import TINY_FLUX, flux_pipeline
from loramill.models.block_swap import swap_blocks, swap_counts
from loramill.train import config as train_config
from loramill.train.config import TrainConfig

DEEPER = {**TINY_FLUX["transformer"], "num_layers": 4, "num_single_layers": 4}
FLUX = {"t5xxl_max_token_length": 16, "timestep_sampling": "shift"}
CHECKPOINTED = {**FLUX, "gradient_checkpointing": True, "max_train_steps": 3, "save_steps": 3}


def test_blocks_are_counted_as_kohya_counts_them():
    assert swap_counts(18, 19, 38) == (9, 18)  # kohya's guide's 18
    assert swap_counts(35, 19, 38) == (17, 36)  # its most for FLUX.1
    assert swap_counts(1, 19, 38) == (0, 2)
    with pytest.raises(LoramillError) as refused:
        swap_counts(36, 19, 38)
    assert str(refused.value) == (
        "train.blocks_to_swap 36: swaps 18 of the transformer's 19 double blocks and 36 of its "
        "38 single blocks, and two of each kind stay on the GPU (as kohya counts); use at most 35"
    )


def transformer_with_lora():
    from diffusers import FluxTransformer2DModel
    from peft import LoraConfig

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**DEEPER, guidance_embeds=True).requires_grad_(False)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.2"]
    model.add_adapter(
        LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=targets)
    )
    model.enable_gradient_checkpointing()
    return model


def step(model, between=lambda: None) -> dict[str, torch.Tensor]:
    """One forward and backward on fixed inputs (``between`` called between them); the LoRA
    gradients."""
    draw = torch.Generator().manual_seed(1)
    out = model(
        hidden_states=torch.randn(1, 16, 64, generator=draw),
        encoder_hidden_states=torch.randn(1, 8, 32, generator=draw),
        pooled_projections=torch.randn(1, 32, generator=draw),
        timestep=torch.tensor([0.5]),
        img_ids=torch.zeros(16, 3),
        txt_ids=torch.zeros(8, 3),
        guidance=torch.tensor([1.0]),
    ).sample
    between()
    out.square().mean().backward()
    return {name: p.grad for name, p in model.named_parameters() if p.requires_grad}


def test_swapped_blocks_compute_on_copies_one_block_at_a_time_with_the_same_gradients():
    plain, swapped = transformer_with_lora(), transformer_with_lora()
    swap = swap_blocks(swapped, 2, torch.device("cpu"), torch.float32)
    assert len(swap.frozen) == 1 + 2  # the last double block, the last two single ones
    swap.pin()  # on the CPU: each block's host copies gathered into one buffer, no lock
    assert all(len({h.untyped_storage().data_ptr() for *_, h in b}) == 1 for b in swap.frozen)
    # the frozen tensors are no parameters: model.to, accelerate and DDP leave them be
    frozen = lambda model: sum(not p.requires_grad for p in model.parameters())  # noqa: E731
    assert frozen(plain) - frozen(swapped) == sum(len(block) for block in swap.frozen)
    hosts = {id(host) for block in swap.frozen for _, _, host in block}
    reads, held = [], []

    def loaded_blocks() -> int:
        return sum(any(getattr(m, n) is not h for m, n, h in block) for block in swap.frozen)

    def check(module, _):
        reads.append(id(module.weight) in hosts)
        held.append(loaded_blocks())

    for block in swap.frozen:
        for module, name, _ in block:
            if isinstance(module, torch.nn.Linear) and name == "weight":
                module.register_forward_pre_hook(check)
    between = []
    want, got = step(plain), step(swapped, lambda: between.append(loaded_blocks()))
    # each Linear of the swapped blocks runs twice: forward and its recomputation in backward
    assert len(reads) == 2 * 26 and not any(reads)
    assert max(held) == 1 and between == [0] and loaded_blocks() <= 1
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


@pytest.fixture(scope="module")
def deeper_flux(tmp_path_factory):
    """The tiny FLUX.1 [dev] model with 4 double and 4 single blocks: room for a swap."""
    folder = tmp_path_factory.mktemp("deeper-flux")
    flux_pipeline({**TINY_FLUX, "transformer": DEEPER}).save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("precision", [{}, {"mixed_precision": "bf16", "fp8_base": True}])
def test_a_swapping_run_trains_the_adapter_of_one_that_does_not(
    prepared, deeper_flux, tmp_path, caplog, monkeypatch, precision
):
    """On the device's rules but the CPU's memory (the GPU is the only device it is for)."""
    monkeypatch.setattr(train_config, "SWAP_DEVICES", ("cuda", "cpu"))
    config = {**CHECKPOINTED, **precision}
    cache = {"cache_root": tmp_path / "cache"}
    plain, _ = train_logged(prepared, tmp_path / "plain", deeper_flux, caplog, config, **cache)
    swapped, lines = train_logged(
        prepared, tmp_path / "swap", deeper_flux, caplog, {**config, "blocks_to_swap": 2}, **cache
    )
    assert "blocks_to_swap: 1 double and 2 single blocks wait in CPU memory" in lines
    assert [digest(p) for p in swapped] == [digest(p) for p in plain]


def test_blocks_to_swap_on_the_cpu_is_refused_in_one_line(prepared, deeper_flux, tmp_path, caplog):
    with pytest.raises(LoramillError) as refused:
        train_logged(prepared, tmp_path, deeper_flux, caplog, {**CHECKPOINTED, "blocks_to_swap": 2})
    assert str(refused.value) == (
        "train.blocks_to_swap: swapping blocks between CPU and GPU memory needs a CUDA GPU, "
        "and the device is cpu; remove it"
    )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({}, "train.blocks_to_swap needs train.gradient_checkpointing: true"),
        (
            {"gradient_checkpointing": True, "quantize_base": "nf4"},
            "train.blocks_to_swap: not with quantize_base: nf4",
        ),
    ],
)
def test_blocks_to_swap_without_checkpointing_or_with_bitsandbytes_is_refused(options, message):
    with pytest.raises(LoramillError, match=message):
        TrainConfig.from_dict({"blocks_to_swap": 4, **options})
