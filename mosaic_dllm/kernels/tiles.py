"""GEMMs whose every row is computed the same way however many rows the call has: batch invariance.

A BLAS picks its kernel, blocking and thread split by the shape of the call, so the same row
multiplied by the same weight can round differently in a call of 3 rows and in one of 1,500. The
device profile (`device/`) measures which call sizes give a row the official whole call's bits:
on some devices every call of at least a few rows does (a `free` rule: calls take whole chunks and
only a call on fewer rows runs zero-padded), on others only calls of a fixed tile of rows do (the
planned kernels then multiply in tiles of exactly that many rows; a tail shorter than a tile is
computed as the last full tile, its overlapping rows again and identically). Either way a token's
arithmetic is the same alone, packed with other requests, or chunked by the planner.

Elementwise kernels have the same trap on a smaller scale: PyTorch vectorizes a flat loop and
finishes the elements past the last full vector with a scalar function, and for SiLU (unlike exp,
cos or rsqrt) the scalar function can round differently. So the SwiGLU's rule is the one its two
GEMM widths and its SiLU width all allow.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..device import GemmRule
from ..memory.prediction import is_predicting
from ..models.quantized import QUANTIZED_CALL_ROWS, QuantizedWeight
from .sharded import SHARDED_CALL_ROWS, ShardedWeight


def _calls(x: Tensor, n: int, size: int | None) -> list[tuple[int, int]]:
    """[start, end) of each call over n rows, `size` rows each (None: one call); the tail runs as
    the last full call. A prediction (fake tensors: shapes, no values) runs the first only: no call
    allocates anything the others do not, and thousands of calls are thousands of dispatches."""
    if size is None or n <= size:
        return [(0, n)]
    starts = [0] if is_predicting() else [min(start, n - size) for start in range(0, n, size)]
    return [(s, s + size) for s in starts]


def tile_workspace(
    x: Tensor, weight: Tensor | QuantizedWeight, rule: GemmRule, few_rows: bool = False, rows: int | None = None
) -> int:
    """Bytes a call on fewer rows than `rule` allows allocates (the padded input and output), and
    what a quantized or sharded weight's call allocates besides (`rows`: the most a call multiplies,
    when the caller knows it is fewer than such a call's)."""
    padded = rule.padded_rows(weight.shape[1], few_rows) * (weight.shape[0] + weight.shape[1]) * x.element_size()
    return padded + weight_workspace(weight, rows)


def weight_workspace(weight: Tensor | QuantizedWeight | ShardedWeight, rows: int | None = None) -> int:
    """A quantized kernel's fresh output (and dequantized weight, off CPU) for its largest call; a
    sharded weight's gathered columns (for calls of at most `rows` rows, when given)."""
    if isinstance(weight, ShardedWeight):
        return weight.workspace(rows or SHARDED_CALL_ROWS)
    return weight.call_workspace(QUANTIZED_CALL_ROWS) if isinstance(weight, QuantizedWeight) else 0


def tiled_mm(x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor, rule: GemmRule, few_rows=False) -> None:
    """out = x @ weight.T (+ bias) for (n, K) rows, in the calls `rule` keeps exact."""
    n = x.shape[0]
    if n == 0 or x.device.type == "meta":
        return
    padded = rule.padded_rows(weight.shape[1], few_rows)
    if n < padded:
        _on_padded_tile(x, padded, out, lambda rows, result: _mm(rows, weight, bias, result))
        return
    for start, end in _calls(x, n, rule.rows_per_call(weight.shape[1], few_rows)):
        _mm(x[start:end], weight, bias, out[start:end])


def _on_padded_tile(x: Tensor, size: int, out: Tensor, run) -> None:
    """`run(rows, result)` on `x`'s rows zero-padded to a full tile; the first rows of the result to `out`."""
    n = x.shape[0]
    padded = torch.zeros((size, x.shape[1]), dtype=x.dtype, device=x.device)
    padded[:n] = x
    result = torch.empty((size, out.shape[1]), dtype=out.dtype, device=out.device)
    run(padded, result)
    out.copy_(result[:n])


def _mm(x: Tensor, weight: Tensor | QuantizedWeight | ShardedWeight, bias: Tensor | None, out: Tensor) -> None:
    if isinstance(weight, ShardedWeight):  # tensor parallel: this rank's columns, the others' gathered
        weight.multiply_into(x, bias, out)
        return
    if isinstance(weight, QuantizedWeight):  # no out= form: calls of at most QUANTIZED_CALL_ROWS rows, copied
        for start, end in _calls(x, x.shape[0], QUANTIZED_CALL_ROWS):
            out[start:end].copy_(weight.linear(x[start:end], bias))
        return
    if bias is None:
        torch.mm(x, weight.t(), out=out)
    else:  # one fused addmm, as F.linear does for a contiguous input with bias
        torch.addmm(bias, x, weight.t(), out=out)


def tiled_linear(x: Tensor, weight: Tensor, bias: Tensor | None, rule: GemmRule) -> Tensor:
    """F.linear over (n, K) rows, batch-invariant (a fresh output)."""
    out = torch.empty((x.shape[0], weight.shape[0]), dtype=x.dtype, device=x.device)
    tiled_mm(x, weight, bias, out, rule)
    return out


def tiled_swiglu(
    x: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
    out: Tensor,
    rule: GemmRule,
    g: Tensor | None = None,
    u: Tensor | None = None,
) -> None:
    """out = down(silu(gate(x)) * up(x)) for (n, H) rows, in the calls `rule` keeps exact; the
    intermediates go to `g` and `u` ((n, I) buffers) or to scratch of one call's rows."""
    n, width = x.shape[0], gate.shape[1]
    if n == 0 or x.device.type == "meta":
        return
    padded = rule.padded_rows(width)
    if n < padded:
        _on_padded_tile(x, padded, out, lambda rows, result: tiled_swiglu(rows, gate, up, down, result, rule))
        return
    size = rule.rows_per_call(width)
    if g is None or u is None:  # one call's rows (free: all n, as the official MoE expert holds them)
        g, u = (torch.empty((size or n, w.shape[0]), dtype=x.dtype, device=x.device) for w in (gate, up))
        here = lambda start, end: slice(0, end - start)  # noqa: E731
    else:
        here = lambda start, end: slice(start, end)  # noqa: E731
    for start, end in _calls(x, n, size):  # the tail: the last full call, recomputed from x
        rows, at = slice(start, end), here(start, end)
        _mm(x[rows], gate, None, g[at])
        torch.nn.functional.silu(g[at], inplace=True)
        _mm(x[rows], up, None, u[at])
        g[at].mul_(u[at])
        _mm(g[at], down, None, out[rows])


def swiglu_workspace(x: Tensor, gate: Tensor, rule: GemmRule) -> int:
    """Bytes `tiled_swiglu` allocates at most with its caller's intermediates (a padded call; a
    tile's intermediates without them: the MoE experts, whose rows the MoE op declares; a
    quantized kernel's call output, one GEMM at a time)."""
    padded = rule.padded_rows(gate.shape[1]) * (2 * x.shape[-1] + 2 * gate.shape[0]) * x.element_size()
    if isinstance(gate, ShardedWeight):  # one gathered product at a time: gate's and up's, or down's (H wide)
        down = SHARDED_CALL_ROWS * (gate.shape[1] // gate.ranks + gate.shape[1]) * x.element_size()
        return padded + max(weight_workspace(gate), down)
    if not isinstance(gate, QuantizedWeight):
        return padded
    down_output = QUANTIZED_CALL_ROWS * gate.shape[1] * x.element_size()  # gate's and up's are weight_workspace
    return padded + weight_workspace(gate) + down_output


def fresh_swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, rule: GemmRule) -> Tensor:
    """`tiled_swiglu` into a fresh output (the MoE experts' rows)."""
    out = torch.empty((x.shape[0], down.shape[0]), dtype=x.dtype, device=x.device)
    tiled_swiglu(x, gate, up, down, out, rule)
    return out
