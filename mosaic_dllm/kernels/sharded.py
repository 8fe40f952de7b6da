"""A linear weight split by output rows over the ranks of a torch.distributed group (tensor
parallel): each rank holds N / ranks rows and a product gathers the other ranks' columns, so the
weight stands where the whole (N, K) weight stands and every planned kernel multiplies by it
unchanged (`tiles._mm`). Each output element is one device's dot product over the whole input."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

# Rows a gathered product runs at a time: bounds the scratch a product allocates (its rank's
# columns and every rank's) whatever the call's rows; the last call overlaps the one before.
SHARDED_CALL_ROWS = 256


class ShardedWeight:
    """This rank's rows (`local`) of an (N, K) weight split over `ranks` ranks of `group`."""

    def __init__(self, local: Tensor, ranks: int, group: dist.ProcessGroup | None = None):
        self.local, self.ranks, self.group = local, ranks, group
        self.shape = torch.Size((local.shape[0] * ranks, local.shape[1]))
        self.dtype, self.device = local.dtype, local.device

    @classmethod
    def meta(cls, shape: tuple[int, int], dtype: torch.dtype, ranks: int) -> ShardedWeight:
        """Shapes only, for a trace."""
        return cls(torch.empty((shape[0] // ranks, shape[1]), dtype=dtype, device="meta"), ranks)

    @property
    def nbytes(self) -> int:
        return self.local.nbytes

    def element_size(self) -> int:
        return self.dtype.itemsize

    def __repr__(self) -> str:
        return f"ShardedWeight({tuple(self.shape)}, 1/{self.ranks} held, {self.dtype}, {self.device})"

    def workspace(self, rows: int = SHARDED_CALL_ROWS) -> int:
        """Bytes one product allocates at most: its rank's columns and every rank's, for a call of
        `rows` rows (no call has more than SHARDED_CALL_ROWS; a product on fewer rows, fewer)."""
        return rows * (self.shape[0] // self.ranks + self.shape[0]) * self.element_size()

    def multiply_into(self, x: Tensor, bias: Tensor | None, out: Tensor) -> None:
        """out = x @ W.T (+ bias, this rank's rows of it), columns gathered from every rank."""
        n, mine = x.shape[0], self.local.shape[0]
        size = min(n, SHARDED_CALL_ROWS)
        local = torch.empty((size, mine), dtype=out.dtype, device=out.device)
        every = torch.empty((self.ranks, size, mine), dtype=out.dtype, device=out.device)
        for start in sorted({min(s, n - size) for s in range(0, n, size)}):
            rows = x[start : start + size]
            if bias is None:
                torch.mm(rows, self.local.t(), out=local)
            else:  # one fused addmm, as F.linear does
                torch.addmm(bias, rows, self.local.t(), out=local)
            dist.all_gather(list(every.unbind(0)), local, group=self.group)
            out[start : start + size].unflatten(1, (self.ranks, mine)).copy_(every.transpose(0, 1))
