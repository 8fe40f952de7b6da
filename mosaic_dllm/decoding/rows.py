"""Where a sampler's logits come from, and the official random stream replayed row by row.

A sampler asks the executor for the logits of the hidden rows it reads. The eager executor gives
every row at once, as the official code computes them; the Mosaic executor gives the requested
rows, chunk by chunk. Either way the sampler sees (rows, (B, C, V) logits) chunks and reduces them
per row.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime.executor import RowChunks

PositionLogits = Iterator[tuple[Tensor, Tensor]]  # (positions (C,), logits (C, V)) as a sampler reduces them


def select_rows(chunks: RowChunks, wanted: Tensor, length: int) -> Iterator[tuple[slice, Tensor]]:
    """Executor chunks as (slice of `wanted`, (B, n, V) logits of those hidden rows).

    A chunk of all `length` canvas rows is the official full logits (the eager executor), from
    which the wanted rows are gathered; any other chunk is the next piece of `wanted` (the Mosaic
    executor). Decided by size alone, so it also runs on fake tensors.
    """
    done = 0
    for rows, logits in chunks:
        if rows.numel() == length:
            yield slice(0, wanted.numel()), logits[:, wanted]
            done = wanted.numel()
        else:
            yield slice(done, done + rows.numel()), logits
            done += rows.numel()


def cfg_combine(cfg_scale: float):
    """(B, ..., V) -> (..., V): the conditional row alone, or un + (cfg + 1) * (cond - un)."""
    if cfg_scale <= 0:
        return lambda logits: logits[0]

    def combine(logits: Tensor) -> Tensor:
        cond, un = logits[0], logits[1]
        return un + (cfg_scale + 1) * (cond - un)

    return combine


class UniformReplay:
    """The official float64 uniform draw over (L, V), replayed row by row.

    The official sampler draws rand(1, L, V) in one call; the CPU generator fills it element by
    element, so drawing the same rows in order, and discarding the rows nobody reads, reproduces
    it exactly with memory for one chunk of rows only: rows nobody reads are drawn and dropped in
    pieces no larger than the largest chunk taken so far, so the plan's per-row sampler cost
    (decoding/cost.py measures a take across such a gap) covers them.
    """

    def __init__(self, gen: torch.Generator, rows: int, vocab: int, device: torch.device, wanted: Tensor | None = None):
        """`wanted`: the rows the sampler asked for, in order; chunks of exactly those rows then take
        their positions from it (no read of the executor's positions, so a prediction on fake
        tensors works too)."""
        self.gen, self.rows, self.vocab, self.device = gen, rows, vocab, device
        self.wanted = wanted.tolist() if wanted is not None else None
        self.taken = 0  # of `wanted`
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
        n = positions.numel()
        if n == self.rows - self.next_row:  # every row left, ascending: no need to read them
            pos = list(range(self.next_row, self.rows))
        elif self.wanted is not None:  # the next chunk of the rows the sampler asked for
            pos, self.taken = self.wanted[self.taken : self.taken + n], self.taken + n
        else:
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


def propose(
    chunks: PositionLogits,
    x: Tensor,
    vocab: int,
    temperature: float,
    remasking: str,
    gen: torch.Generator,
    wanted: Tensor | None = None,
    softmax_dtype: torch.dtype | None = None,
    uniform_dtype: torch.dtype = torch.float32,
    never: tuple[int, ...] = (),
    unranked: tuple[int, ...] = (),
) -> tuple[Tensor, Tensor]:
    """LLaDA's reduction of a step's row logits: x0 and confidence (1, L) for the positions in
    `chunks`, per row exactly as the official sampler (float64 Gumbel-max at temperature > 0; the
    confidence a softmax in the logits' dtype, or in `softmax_dtype`: Fast-dLLM's float64; or
    uniform noise in `uniform_dtype`); `wanted`: the rows asked for (chunks of exactly those rows, in order, or of
    every row). Positions not in `chunks` keep their token and get confidence -inf. `never`: token
    ids whose logits are -inf before x0 is chosen; `unranked`: ids whose logits are -inf in the
    confidence's softmax only (LLaDA-Instruct's evaluation options).
    """
    length = x.shape[1]
    x0 = x.clone()
    confidence = None
    noise = UniformReplay(gen, length, vocab, x.device, wanted) if temperature > 0 else None
    never_ids = torch.tensor(never, device=x.device) if never else None  # once a step, not a chunk
    unranked_ids = torch.tensor(unranked, device=x.device) if unranked else None
    for pos, logits in chunks:  # logits (C, V)
        if never_ids is not None:  # a copy: the executor's logits are read-only (inference tensors)
            logits = logits.index_fill(-1, never_ids, -torch.inf)
        if noise is not None:  # Gumbel-max in float64, as in the official add_gumbel_noise
            lg = logits.to(torch.float64)
            rows_x0 = torch.argmax(lg.exp() / (-torch.log(noise.take(pos))) ** temperature, dim=-1)
            del lg
        else:
            rows_x0 = torch.argmax(logits, dim=-1)
        x0[0, pos] = rows_x0
        if unranked_ids is not None:
            logits = logits.index_fill(-1, unranked_ids, -torch.inf)
        if remasking == "low_confidence":
            if confidence is None:
                dtype = softmax_dtype or logits.dtype
                confidence = torch.full((1, length), -torch.inf, dtype=dtype, device=x.device)
            p = F.softmax(logits if softmax_dtype is None else logits.to(softmax_dtype), dim=-1)
            confidence[0, pos] = torch.gather(p, dim=-1, index=rows_x0.unsqueeze(-1)).squeeze(-1)
            del p  # not alive while the next chunk is reduced: the plan budgets one chunk's temporaries
    if noise is not None:
        noise.finish()  # keep the generator where the official full draw leaves it
    if remasking == "random":
        confidence = torch.rand((1, length), generator=gen, device=x.device, dtype=uniform_dtype)
    if confidence is None:  # no position to read this step
        confidence = torch.full((1, length), -torch.inf, device=x.device)
    return x0, confidence
