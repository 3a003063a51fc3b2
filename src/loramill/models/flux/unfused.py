"""A kohya-format Flux LoRA module back into the LoRAs of the diffusers modules it fuses
(``train.init_from`` a file in Black Forest Labs' layout): the inverse of loramill's export
(loramill.export.flux.kohya) and the reading of kohya sd-scripts' own files.

A fused module (``double_blocks.0.img_attn.qkv`` = ``to_q``, ``to_k``, ``to_v``) is stored as one
down and one up matrix. Two writers, two structures, both split exactly:

- kohya sd-scripts trains one LoRA on the fused Linear: a down matrix of the network's rank
  shared by every part, the up matrix's rows split among them, alpha the network's;
- loramill's export stacks n separately trained LoRAs: n × rank down rows, a block-diagonal up
  matrix, alpha n × the network's (so alpha / rank, the scale, is the parts').

Anything else (another rank or alpha, an up matrix that is not block-diagonal) is refused,
because its parts would load at another strength than the file's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from loramill import LoramillError


def split_fused(
    name: str,
    down: torch.Tensor,
    up: torch.Tensor,
    alpha: float,
    sizes: Sequence[int],
    network: tuple[int, float],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of each part, in order, of fused module ``name`` whose parts have ``sizes``
    output rows; ``network``: the configured rank and alpha."""
    rank, want = network
    count, rows = len(sizes), down.shape[0]
    if up.shape[0] != sum(sizes):
        raise LoramillError(
            f"'{name}': {up.shape[0]} output rows, the model's module has {sum(sizes)}"
        )
    blocks = list(torch.split(up, list(sizes)))
    if rows == rank and alpha == want:  # kohya's: one down for every part
        return [(down, block) for block in blocks]
    if rows == count * rank and alpha == count * want:  # loramill's: stacked, block-diagonal
        pairs = []
        for index, block in enumerate(blocks):
            own = slice(index * rank, (index + 1) * rank)
            rest = torch.cat([block[:, : own.start], block[:, own.stop :]], dim=1)
            if rest.count_nonzero():
                raise LoramillError(f"'{name}': its up matrix is not block-diagonal by part")
            pairs.append((down[own], block[:, own]))
        return pairs
    raise LoramillError(
        f"'{name}': rank {rows}, alpha {alpha:g} over {count} part(s); the config's network has "
        f"rank {rank}, alpha {want:g} (set train.rank and train.alpha)"
    )
