"""GEMMs whose every row is computed the same way however many rows the call has: batch invariance.

A BLAS picks its kernel, blocking and thread split by the shape of the call, so the same row
multiplied by the same weight can round differently in a call of 40 rows and in one of 1,500
(measured on this project's CPUs: fp32 rows differ between calls of 1, 2-15 and 16+ rows; bf16 rows
at K = 4096 differ between many row counts). Within calls of one fixed row count, a row's result
depends only on the row, never on its neighbours or its place in the call (tested, including with
the rows rotated between calls). So the planned kernels multiply in tiles of exactly `ROW_TILE`
rows: a tail shorter than a tile is computed as the last full tile (overlapping rows are computed
again, identically), and a call of fewer rows than a tile runs on a zero-padded tile. Then a
token's arithmetic is the same alone, packed with other requests, or chunked by the planner.
"""

from __future__ import annotations

import torch
from torch import Tensor

ROW_TILE = 64


def tile_workspace(x: Tensor, weight: Tensor) -> int:
    """Bytes a call on fewer rows than a tile allocates (the padded input and output tiles)."""
    return ROW_TILE * (weight.shape[0] + weight.shape[1]) * x.element_size()


def tiled_mm(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """out = x @ weight.T (+ bias) for (n, K) rows, computed ROW_TILE rows per call."""
    n = x.shape[0]
    if n == 0 or x.device.type == "meta":
        return
    if n < ROW_TILE:
        padded = torch.zeros((ROW_TILE, x.shape[1]), dtype=x.dtype, device=x.device)
        padded[:n] = x
        result = torch.empty((ROW_TILE, weight.shape[0]), dtype=out.dtype, device=out.device)
        _mm(padded, weight, bias, result)
        out.copy_(result[:n])
        return
    for start in range(0, n, ROW_TILE):
        start = min(start, n - ROW_TILE)  # the tail: the last full tile
        _mm(x[start : start + ROW_TILE], weight, bias, out[start : start + ROW_TILE])


def _mm(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:  # one fused addmm, as F.linear does for a contiguous input with bias
        torch.addmm(bias, x, weight.t(), out=out)


def tiled_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear over (n, K) rows, batch-invariant (a fresh output)."""
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    tiled_mm(x, weight, bias, out)
    return out
