"""kohya's ``blocks_to_swap`` for Flux's transformer: the frozen weights of its last blocks live
in CPU memory and come to the GPU only while their block runs, so a GPU that cannot hold the
whole transformer trains it.

kohya's count: ``blocks_to_swap // 2`` double blocks and twice the rest single blocks, each
kind keeping at least two blocks on the GPU (19 + 38 blocks: at most 35).

Written here rather than taken from diffusers' group offloading, which moves every parameter
of a group: the trained LoRA weights too (between the optimizer's steps), and with CUDA
streams it puts back the host copy taken when it was set up, losing their updates. Here only
the frozen tensors move. They stop being parameters of the model and become plain attributes
of their modules, so ``model.to``, accelerate and DDP leave them in host memory; a block's
forward pre-hook puts device copies in their place and its forward hook the host ones back.

The backward pass needs a block's weights again: they come back when gradient checkpointing
recomputes the block's forward there (hooks included), so swapping needs checkpointing.
Nothing is changed in place: a copy autograd still holds stays valid, and a swapped block
computes the same bits as one that never moved. The hooks hold one block's copies at a time:
a block's pre-hook drops the copies of the block before it, since a recomputation may stop
early, before its block's forward hook runs. Copies are made on the compute stream from pinned
memory: a transfer is not overlapped with the previous block's compute.
"""

from __future__ import annotations

import logging
import os
from functools import partial
from typing import Any

import torch

from loramill import LoramillError

log = logging.getLogger(__name__)
ALIGN = 64  # bytes: where each tensor starts in a block's buffer (aligned for any dtype)
PAGE = os.sysconf("SC_PAGE_SIZE")
Frozen = list[tuple[torch.nn.Module, str, torch.Tensor]]  # (module, attribute, host copy)


def _fits(blocks_to_swap: int, double: int, single: int) -> bool:
    return (
        blocks_to_swap // 2 <= double - 2
        and (blocks_to_swap - blocks_to_swap // 2) * 2 <= single - 2
    )


def swap_counts(blocks_to_swap: int, double: int, single: int) -> tuple[int, int]:
    """The double and single blocks swapped, counted as kohya counts them."""
    swapped = (blocks_to_swap // 2, (blocks_to_swap - blocks_to_swap // 2) * 2)
    if not _fits(blocks_to_swap, double, single):
        most = max((n for n in range(blocks_to_swap) if _fits(n, double, single)), default=0)
        raise LoramillError(
            f"train.blocks_to_swap {blocks_to_swap}: swaps {swapped[0]} of the transformer's "
            f"{double} double blocks and {swapped[1]} of its {single} single blocks, and two of "
            f"each kind stay on the GPU (as kohya counts); use at most {most}"
        )
    return swapped


def _host_tensors(block: torch.nn.Module, dtype: torch.dtype) -> Frozen:
    """Turn ``block``'s frozen parameters into plain attributes in ``dtype``."""
    frozen = []
    for module in block.modules():
        for name, param in list(module._parameters.items()):
            if param is None or param.requires_grad:
                continue
            del module._parameters[name]
            host = param.detach().to("cpu", dtype=dtype if param.is_floating_point() else None)
            setattr(module, name, host)
            frozen.append((module, name, host))
    return frozen


class BlockSwap:
    """The swapped blocks of one transformer and the hooks that move their frozen tensors."""

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device, dtype: Any) -> None:
        self.device = device
        self.loaded: int | None = None  # the block whose device copies are in place
        self.frozen = [_host_tensors(block, dtype) for block in blocks]
        for index, block in enumerate(blocks):
            block.register_forward_pre_hook(partial(self._load, index))
            block.register_forward_hook(partial(self._release, index))

    def _place(self, index: int, on_device: bool) -> None:
        for module, name, host in self.frozen[index]:
            setattr(
                module,
                name,
                host.to(self.device, non_blocking=True, copy=True) if on_device else host,
            )

    def _load(self, index: int, *_: Any) -> None:
        if self.loaded == index:
            return
        if self.loaded is not None:
            self._place(self.loaded, on_device=False)
        self._place(index, on_device=True)
        self.loaded = index

    def _release(self, index: int, *_: Any) -> None:
        self._place(index, on_device=False)
        self.loaded = None

    def pin(self) -> None:
        """Gather each block's host copies into one buffer and, on CUDA, page-lock it in place
        (after any change of their dtype: fp8_base). Copies from page-locked memory are
        asynchronous and faster; ``Tensor.pin_memory`` would round every tensor up to a power
        of two (torch's caching host allocator: FLUX.1's 35 blocks, 20 GiB in bf16, would
        lock 31.6). Without the lock the copies are synchronous, and still right."""
        for index, frozen in enumerate(self.frozen):
            buffer, self.frozen[index] = _gathered(frozen)
            self._place(index, on_device=False)
            if self.device.type == "cuda":
                _page_lock(buffer)


def _gathered(frozen: Frozen) -> tuple[torch.Tensor, Frozen]:
    """One buffer of whole pages holding every tensor of ``frozen`` (each at an offset
    aligned for any dtype), and the entries as views into it."""
    sizes = [-(-host.nbytes // ALIGN) * ALIGN for _, _, host in frozen]
    pages = -(-sum(sizes) // PAGE) * PAGE
    spare = torch.empty(pages + PAGE, dtype=torch.uint8)
    first = -spare.data_ptr() % PAGE
    buffer = spare[first : first + pages]
    gathered, start = [], 0
    for (module, name, host), size in zip(frozen, sizes, strict=True):
        view = buffer[start : start + host.nbytes].view(host.dtype).view(host.shape)
        gathered.append((module, name, view.copy_(host)))
        start += size
    return buffer, gathered


def _page_lock(buffer: torch.Tensor) -> None:
    # torch's own in-place pinning (torch.distributed's state-dict staging) calls the same;
    # flags 0: cudaHostRegisterDefault. Whole pages of its own: no two registrations meet.
    code = int(torch.cuda.cudart().cudaHostRegister(buffer.data_ptr(), buffer.nbytes, 0))
    if code:
        log.warning("blocks_to_swap: page-locking a block's weights failed (CUDA error %d); "
                    "its copies to the GPU are synchronous", code)  # fmt: skip


def transformer_counts(transformer: Any, blocks_to_swap: int) -> tuple[int, int]:
    """The double and single blocks of ``transformer`` (a Flux or Chroma one) swapped."""
    double, single = transformer.transformer_blocks, transformer.single_transformer_blocks
    return swap_counts(blocks_to_swap, len(double), len(single))


def swap_blocks(
    transformer: Any, blocks_to_swap: int, device: torch.device, dtype: Any
) -> BlockSwap | None:
    """Swap the last blocks of ``transformer`` (None when none are): call it before the model
    moves to ``device``, so their weights never go there whole."""
    if not blocks_to_swap:
        return None
    swapped_double, swapped_single = transformer_counts(transformer, blocks_to_swap)
    log.info(
        "blocks_to_swap: %d double and %d single blocks wait in CPU memory",
        swapped_double,
        swapped_single,
    )
    double, single = transformer.transformer_blocks, transformer.single_transformer_blocks
    blocks = [*double[len(double) - swapped_double :], *single[len(single) - swapped_single :]]
    return BlockSwap(blocks, device, dtype)
