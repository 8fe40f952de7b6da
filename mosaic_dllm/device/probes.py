"""Small measurements of how a device's kernels round and allocate, run on that device.

Each probe compares, bit for bit, a kernel called on part of its input with the same kernel called
on the whole input (the official code's call), over inputs drawn from a fixed seed, and returns
the least restrictive rule that held on every comparison. They take milliseconds to about a second
each; `profile.py` keeps their results on disk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..memory.rss import PeakMemory
from ..models.groups import MIN_CHUNK_TOKENS, spans
from ..models.quantized import linear, quantize
from ..models.spec import QuantScheme
from .rules import TILE_CANDIDATES, AttentionRule, GemmRule

# Row counts compared with the whole call: every count a padded call may use, then odd and even
# ones beyond; the whole call has REFERENCE_ROWS rows. A call's rows are compared at two offsets
# into the input (a row's bits must not depend on where it sits in its call).
PROBE_COUNTS = (*range(1, 65), 67, 96, 99, 128, 129, 200, 256, 257)
REFERENCE_ROWS = 384
OFFSETS = (0, 5)
# Output columns a GEMM probe uses at most: a weight's rows only split the work, and wide outputs
# would make a probe of the LM head (100k+ columns) take minutes.
PROBE_COLUMNS = 1024

# Query-block rules tried least restrictive first: any block of at least the token groups' smallest
# chunk; 64-aligned blocks of 64; blocks of >= 768 queries at multiples of 256 (what PyTorch's CPU
# flash attention needs where it picks its query split and AMX packing by the query count).
ATTENTION_CANDIDATES = ((1, MIN_CHUNK_TOKENS), (64, 64), (256, 768))
# (length, heads, kv heads, head dim, batch): below and above the kernels' query-count thresholds,
# plain and grouped heads, head dims that do and do not fill a 64-wide pack.
ATTENTION_SHAPES = ((67, 4, 4, 64, 1), (1100, 4, 2, 64, 2), (1793, 2, 2, 32, 1), (1600, 3, 3, 80, 1))
# The K/V copy probe: enough keys that a copy stands out of the RSS noise.
COPY_QUERIES, COPY_KEYS, COPY_HEADS, COPY_HEAD_DIM = 768, 4096, 8, 128


def _generator(device: torch.device, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def _randn(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, g: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=g, device=device).to(dtype)


def rule_from(exact_counts: set[int]) -> GemmRule:
    """The rule a set of exact probe counts allows: free from the smallest count past which every
    probed count is exact (if that is within a tile), else the exact tile candidates."""
    inexact = [n for n in PROBE_COUNTS if n not in exact_counts]
    first_free = max(inexact, default=0) + 1
    tiles = tuple(t for t in TILE_CANDIDATES if t in exact_counts)
    if first_free <= TILE_CANDIDATES[1]:
        return GemmRule(first_free, True, tiles)
    return GemmRule(tiles[0] if tiles else TILE_CANDIDATES[1], False, tiles)


def exact_row_counts(run, width: int, dtype: torch.dtype, device: torch.device, seed: int) -> set[int]:
    """The probe counts whose calls of `run` give every row the whole call's bits."""
    x = _randn((REFERENCE_ROWS + max(OFFSETS), width), dtype, device, _generator(device, seed))
    whole = {offset: run(x[offset : offset + REFERENCE_ROWS]) for offset in OFFSETS}
    return {n for n in PROBE_COUNTS if all(torch.equal(run(x[o : o + n]), whole[o][:n]) for o in OFFSETS)}


def probe_gemm(
    dtype: torch.dtype, in_width: int, out_width: int, device: torch.device, scheme: QuantScheme | None = None
) -> GemmRule:
    """x @ W.T (as F.linear computes it, or the quantized kernel for a weight quantized by
    `scheme`) by row count, for a (out_width, in_width) weight."""
    g = _generator(device, in_width * 31 + out_width)
    weight = _randn((min(out_width, PROBE_COLUMNS), in_width), dtype, device, g) / in_width**0.5
    if scheme is not None:
        weight = quantize(weight, scheme)
    return rule_from(exact_row_counts(lambda x: linear(x, weight), in_width, dtype, device, in_width))


def probe_silu(dtype: torch.dtype, width: int, device: torch.device) -> GemmRule:
    """SiLU over (n, width) rows by row count: a vectorised loop finishes past its last full vector
    with a scalar function, which for SiLU can round differently."""
    return rule_from(exact_row_counts(F.silu, width, dtype, device, width + 7))


def _attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, **gqa)


def blocks_exact(align: int, min_block: int, dtype: torch.dtype, device: torch.device) -> bool:
    for length, heads, kv_heads, head_dim, batch in ATTENTION_SHAPES:
        g = _generator(device, length + heads)
        q = _randn((batch, heads, length, head_dim), dtype, device, g)
        k, v = (_randn((batch, kv_heads, length, head_dim), dtype, device, g) for _ in range(2))
        whole = _attend(q, k, v)
        for pieces in (2, 3, 5):
            blocks = spans(length, pieces, align, min_block)
            if len(blocks) < 2:
                continue
            parts = torch.cat([_attend(q[:, :, s:e], k, v) for s, e in blocks], dim=2)
            if not torch.equal(parts, whole):
                return False
    return True


def probe_attention(dtype: torch.dtype, device: torch.device) -> AttentionRule:
    """The least restrictive query-block rule that keeps every row's bits on the probe shapes, and
    whether a call copies its keys and values."""
    align, min_block = next(((a, m) for a, m in ATTENTION_CANDIDATES if blocks_exact(a, m, dtype, device)), (1, 0))
    return AttentionRule(align, min_block, _copies_keys_and_values(dtype, device))


def _copies_keys_and_values(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether one call's memory grows by (at least most of) a copy of its K and V."""
    g = _generator(device, 3)
    shape = (1, COPY_HEADS, COPY_KEYS, COPY_HEAD_DIM)
    q, k, v = (_randn(shape, dtype, device, g) for _ in range(3))
    q = q[:, :, :COPY_QUERIES]
    _attend(q[:, :, :64], k[:, :, :64], v[:, :, :64])  # the kernel's one-time set-up
    with PeakMemory(device) as measured:
        _attend(q, k, v)
    kv_bytes = 2 * k.numel() * k.element_size()
    return measured.growth_bytes >= 0.75 * kv_bytes
