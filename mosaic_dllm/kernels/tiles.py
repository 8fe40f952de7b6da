"""GEMMs whose every row is computed the same way however many rows the call has: batch invariance.

A BLAS picks its kernel, blocking and thread split by the shape of the call, so the same row
multiplied by the same weight can round differently in a call of 40 rows and in one of 1,500
(measured on this project's CPUs: fp32 rows differ between calls of 1, 2-15 and 16+ rows; bf16 rows
at K = 4096 differ between many row counts). Within calls of one fixed row count, a row's result
depends only on the row, never on its neighbours or its place in the call (tested, including with
the rows rotated between calls). So the planned kernels multiply in tiles of exactly `ROW_TILE`
rows (a function of the weight's width alone: `row_tile`): a tail shorter than a tile is computed
as the last full tile (overlapping rows are computed
again, identically), and a call of fewer rows than a tile runs on a zero-padded tile. Then a
token's arithmetic is the same alone, packed with other requests, or chunked by the planner.

Elementwise kernels have the same trap on a smaller scale: PyTorch vectorizes a flat loop and
finishes the elements past the last full vector with a scalar function, and for SiLU (unlike exp,
cos or rsqrt) the scalar function rounds differently. So the SwiGLU runs tile by tile too: a tile
of ROW_TILE rows holds a multiple of every vector width, so every element takes the vector path,
wherever its row sits in the batch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

ROW_TILE = 64
# Wide GEMMs run much faster on larger tiles (bf16 K = 4096 on this CPU: 300 GFLOP/s at 64 rows,
# 600 at 256), and their requests are long; narrow ones pay more for padding than they gain.
WIDE_ROW_TILE, WIDE_FROM = 256, 1024
# The LM head reads a few rows per request (a block's masked positions), so it multiplies in smaller
# tiles: padding 8 rows to 64 would cost 8x the GEMM.
HEAD_ROW_TILE = 16


def row_tile(weight: Tensor) -> int:
    """Rows per GEMM call for `weight` (out, in): fixed by its input width, so the same for every call."""
    return WIDE_ROW_TILE if weight.shape[1] >= WIDE_FROM else ROW_TILE


def tile_workspace(x: Tensor, weight: Tensor, tile: int | None = None) -> int:
    """Bytes a call on fewer rows than a tile allocates (the padded input and output tiles)."""
    return (tile or row_tile(weight)) * (weight.shape[0] + weight.shape[1]) * x.element_size()


def tiled_mm(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, tile: int | None = None) -> None:
    """out = x @ weight.T (+ bias) for (n, K) rows, computed `tile` (default: `row_tile`) rows per call."""
    tile = tile or row_tile(weight)
    n = x.shape[0]
    if n == 0 or x.device.type == "meta":
        return
    if n < tile:
        _on_padded_tile(x, tile, out, lambda rows, result: _mm(rows, weight, bias, result))
        return
    for start in _tile_starts(x, n, tile):
        _mm(x[start : start + tile], weight, bias, out[start : start + tile])


def _tile_starts(x: Tensor, n: int, tile: int) -> list[int]:
    """Where each tile of n >= tile rows starts; the tail runs as the last full tile. A prediction
    (fake tensors: shapes, no values) runs the first only: no tile allocates anything the others
    do not, and thousands of tiles are thousands of dispatches."""
    if is_fake(x):
        return [0]
    return [min(start, n - tile) for start in range(0, n, tile)]


def _on_padded_tile(x: Tensor, size: int, out: Tensor, run) -> None:
    """`run(rows, result)` on `x`'s rows zero-padded to a full tile; the first rows of the result to `out`."""
    n = x.shape[0]
    padded = torch.zeros((size, x.shape[1]), dtype=x.dtype, device=x.device)
    padded[:n] = x
    result = torch.empty((size, out.shape[1]), dtype=out.dtype, device=out.device)
    run(padded, result)
    out.copy_(result[:n])


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


def tiled_swiglu(
    x: Tensor, gate: Tensor, up: Tensor, down: Tensor, out: Tensor, g: Tensor | None = None, u: Tensor | None = None
) -> None:
    """out = down(silu(gate(x)) * up(x)) for (n, H) rows, every op on tiles of `row_tile(gate)` rows;
    the intermediates go to `g` and `u` ((n, I) buffers) or to tile-sized scratch when not given."""
    n, size = x.shape[0], row_tile(gate)
    if n == 0 or x.device.type == "meta":
        return
    if n < size:
        _on_padded_tile(x, size, out, lambda rows, result: tiled_swiglu(rows, gate, up, down, result))
        return
    if g is None or u is None:
        g, u = (torch.empty((size, w.shape[0]), dtype=x.dtype, device=x.device) for w in (gate, up))
        tile = lambda start: slice(0, size)  # noqa: E731
    else:
        tile = lambda start: slice(start, start + size)  # noqa: E731
    for start in _tile_starts(x, n, size):  # the tail: the last full tile, recomputed from x
        rows, here = slice(start, start + size), tile(start)
        _mm(x[rows], gate, None, g[here])
        torch.nn.functional.silu(g[here], inplace=True)
        _mm(x[rows], up, None, u[here])
        g[here].mul_(u[here])
        _mm(g[here], down, None, out[rows])


def swiglu_workspace(x: Tensor, gate: Tensor, down: Tensor) -> int:
    """Bytes `tiled_swiglu` allocates at most (a padded tile, or tile-sized intermediates)."""
    return row_tile(gate) * (2 * x.shape[-1] + 2 * gate.shape[0]) * x.element_size()


def fresh_swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor) -> Tensor:
    """`tiled_swiglu` into a fresh output (the MoE experts' rows)."""
    out = torch.empty((x.shape[0], down.shape[0]), dtype=x.dtype, device=x.device)
    tiled_swiglu(x, gate, up, down, out)
    return out
