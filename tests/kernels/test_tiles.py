"""Batch-invariant kernels: a row's result does not depend on how many rows share its call.

Plain GEMMs and SiLU fail that on this project's CPUs (the first tests show it, so the others mean
something); the kernels of `kernels/tiles.py`, calling in the sizes the device profile keeps exact,
pass it at every row count and offset, under this device's rules and under a tiled rule.
"""

import pytest
import torch
import torch.nn.functional as F

from mosaic_dllm.device import GemmRule, profile_for
from mosaic_dllm.kernels.memory import AllocatorMemory
from mosaic_dllm.kernels.planned import PlannedOps
from mosaic_dllm.kernels.tiles import tiled_linear, tiled_swiglu
from mosaic_dllm.models.packing import Packing

COUNTS = (1, 2, 5, 15, 16, 63, 64, 65, 100, 129, 200, 255, 256, 300)


def rows_by_count(fn, x):
    """fn over every (offset, count) slice of x, compared with fn over all of x: the bad slices."""
    full = fn(x)
    return [
        (o, n)
        for n in COUNTS
        for o in (0, 7)
        if o + n <= x.shape[0] and not torch.equal(fn(x[o : o + n]), full[o : o + n])
    ]


def test_plain_gemm_and_silu_round_rows_by_the_calls_row_count():
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(210, 256, generator=g), torch.randn(96, 256, generator=g)
    assert rows_by_count(lambda t: t @ w.t(), x)  # fp32: small calls round differently (CPUs seen: AMX, AMD)
    silu = torch.randn(210 * 48, generator=g).view(210, 48)
    assert rows_by_count(F.silu, silu)  # the scalar tail after the last full vector rounds differently


@pytest.mark.parametrize("rules", ["this device", "tiled"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("width", [48, 256, 1024])  # 1024: a wide tile (256 rows) under a tiled rule
def test_tiled_kernels_give_a_row_the_same_bits_at_any_count_and_offset(dtype, width, rules):
    g = torch.Generator().manual_seed(width)
    x = torch.randn(310, width, generator=g).to(dtype)
    w = torch.randn(96, width, generator=g).to(dtype)
    b = torch.randn(96, generator=g).to(dtype)
    gate, up = (torch.randn(40, width, generator=g).to(dtype) for _ in range(2))
    down = torch.randn(width, 40, generator=g).to(dtype)
    device = profile_for("cpu").rules(dtype)
    tiled = GemmRule(16, False, (16, 64, 256))
    gemm = device.gemm(width, 96) if rules == "this device" else tiled
    mlp = device.swiglu(width, 40) if rules == "this device" else tiled
    assert not rows_by_count(lambda t: tiled_linear(t, w, None, gemm), x)
    assert not rows_by_count(lambda t: tiled_linear(t, w, b, gemm), x)

    def swiglu(t):
        out = torch.empty(t.shape[0], width, dtype=dtype)
        tiled_swiglu(t, gate, up, down, out, mlp)
        return out

    assert not rows_by_count(swiglu, x)
    # with the caller's intermediates (the planned FFN buffers) the bits are the same
    out, inter = torch.empty(310, width, dtype=dtype), [torch.empty(310, 40, dtype=dtype) for _ in range(2)]
    tiled_swiglu(x, gate, up, down, out, mlp, *inter)
    assert torch.equal(out, swiglu(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_attention_is_each_sequence_alone(dtype):
    """Sequences of 7, 64 and 33 tokens (grouped kv heads) packed: no attention across them."""
    g = torch.Generator().manual_seed(1)
    lengths, heads, kv, hd = (7, 64, 33), 4, 2, 16
    q = torch.randn(1, sum(lengths), heads, hd, generator=g).to(dtype)
    k, v = (torch.randn(1, sum(lengths), kv, hd, generator=g).to(dtype) for _ in range(2))
    ops = PlannedOps(AllocatorMemory(profile_for("cpu").rules(dtype)))
    packed = ops.attention(q.clone(), k, v, Packing(lengths), 0, name="attention")
    start = 0
    for n in lengths:
        part = slice(start, start + n)
        alone = ops.attention(q[:, part].clone(), k[:, part], v[:, part], Packing((n,)), 0, name="attention")
        assert torch.equal(packed[:, part], alone)
        start += n
