"""Where a sampler's logits come from: every position (eager, official) or only the rows it reads.

A decoding policy asks for the logits of the positions it will read. An executor with
`mask_only = False` computes the full (B, L, V) tensor as the official code does; one with
`mask_only = True` computes only the requested rows, chunk by chunk (`MosaicExecutor.row_logits`).
Either way the policy sees a sequence of (positions, (C, V) logits) chunks and reduces them per row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

Chunks = Iterator[tuple[Tensor, Tensor]]  # (positions (C,), logits (C, V))


def position_chunks(
    executor,
    batch: Tensor,
    positions: Tensor | None,
    combine: Callable[[Tensor], Tensor],
    hidden_rows: Callable[[Tensor], Tensor] = lambda p: p,
) -> Chunks:
    """Logits for `positions` of the canvas, combined over the batch by `combine` ((B, ..., V) -> (..., V)).

    positions=None means every position. `hidden_rows` maps positions to the hidden-state rows that
    produce their logits (Dream: p -> p - 1).
    """
    if not executor.mask_only:
        raise ValueError("position_chunks is for mask-only executors; eager ones compute full logits")
    length = batch.shape[1]
    if positions is None:
        positions = torch.arange(length, device=batch.device)
    for part, logits in executor.row_logits(batch, hidden_rows(positions)):
        yield positions[part], combine(logits)


class UniformReplay:
    """The official float64 uniform draw over (L, V), replayed row by row.

    The official sampler draws rand(1, L, V) in one call; the CPU generator fills it element by
    element, so drawing the same rows in order, and discarding the rows nobody reads, reproduces
    it exactly with memory for one chunk of rows only: rows nobody reads are drawn and dropped in
    pieces no larger than the largest chunk taken so far, so the plan's per-row sampler cost
    (decoding/sampler_cost.py measures a take across such a gap) covers them.
    """

    def __init__(self, gen: torch.Generator, rows: int, vocab: int, device: torch.device):
        self.gen, self.rows, self.vocab, self.device = gen, rows, vocab, device
        self.next_row = 0
        self.block_rows = 1

    def _discard(self, upto: int) -> None:
        while self.next_row < upto:
            n = min(self.block_rows, upto - self.next_row)
            torch.rand(n, self.vocab, dtype=torch.float64, generator=self.gen, device=self.device)
            self.next_row += n

    def take(self, positions: Tensor) -> Tensor:
        """(C, V) uniforms for ascending `positions` (all >= any position taken before)."""
        self.block_rows = max(self.block_rows, positions.numel())
        out = torch.empty(positions.numel(), self.vocab, dtype=torch.float64, device=self.device)
        pos = positions.tolist()
        i = 0
        while i < len(pos):
            j = i
            while j + 1 < len(pos) and pos[j + 1] == pos[j] + 1:  # a run of consecutive rows: one draw
                j += 1
            self._discard(pos[i])
            torch.rand(
                j - i + 1, self.vocab, dtype=torch.float64, generator=self.gen, device=self.device, out=out[i : j + 1]
            )
            self.next_row = pos[j] + 1
            i = j + 1
        return out

    def finish(self) -> None:
        self._discard(self.rows)
