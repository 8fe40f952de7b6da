"""Fast-dLLM's block K/V cache of one sequence: what lives across the steps of a block.

A block's first step runs the whole canvas and stores every layer's K (normalised and rotated) and
V of canvas positions [0, keep): the prompt and finished blocks (`prefix`), or every position
(`dual`). The block's other steps run only a window of the canvas through the layers; the window's
queries attend to the cached K/V with the window's own fresh K/V in its place. Storing K rotated is
what the reference computes: it caches K before rotary and rotates every key again at each step,
an elementwise op that gives the same bits as rotating once.

The cache is allocated once at its largest size (`positions`), when it is first stored, so its
bytes are fixed for the request's life and counted by every plan the request runs under.

An int8 cache (opt-in, `cache_dtype`: an approximation, less memory) holds each position's K and V
per head as int8 codes with one float32 scale (absmax / 127), quantized as stored through a
scratch of `STORE_CHUNK` positions that is part of the cache, and dequantized through it as
spliced: no temporaries beyond it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from .spec import ArchSpec

STORE_CHUNK = 64  # positions an int8 cache quantizes at a time (its float32 scratch)


class BlockCache:
    """Every layer's K and V, token-major (positions, kv heads, head dim), of one sequence; in the
    model's dtype, or as int8 codes with a float32 scale per position and head (`int8`)."""

    def __init__(self, spec: ArchSpec, positions: int, int8: bool = False):
        self.layers, self.positions, self.int8 = spec.num_layers, positions, int8
        self.width = (spec.num_kv_heads, spec.head_dim)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.scales: list[tuple[Tensor, Tensor]] = []  # int8: per layer, K's and V's (positions, kv heads)
        self.scratch: Tensor | None = None

    def nbytes(self, dtype: torch.dtype) -> int:
        elements = 2 * self.layers * self.positions * self.width[0] * self.width[1]
        if not self.int8:
            return elements * dtype.itemsize
        scales = 2 * self.layers * self.positions * self.width[0] * 4
        return elements + scales + min(STORE_CHUNK, self.positions) * self.width[0] * self.width[1] * 4

    def _allocate(self, like: Tensor) -> None:
        """Buffers for K / V like `like` (n, kv heads, head dim): a sequence-parallel rank stores only
        its heads (fewer than `width` says: `nbytes` counts them all, an upper bound)."""
        self.width = tuple(like.shape[1:])
        shape, device = (self.positions, *self.width), like.device
        dtype = torch.int8 if self.int8 else like.dtype
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in range(self.layers)]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in range(self.layers)]
        if self.int8:
            self.scales = [
                tuple(torch.empty(shape[:2], dtype=torch.float32, device=device) for _ in range(2))
                for _ in range(self.layers)
            ]
            self.scratch = torch.empty((min(STORE_CHUNK, self.positions), *self.width), device=device)

    def store(self, layer: int, k: Tensor, v: Tensor, at: int = 0) -> None:
        """Keep (n, kv heads, head dim) K and V of positions [at, at + n) of `layer` (allocating on
        first use)."""
        if not self.keys:
            self._allocate(k)
        end = at + k.shape[0]
        if not self.int8:
            self.keys[layer][at:end].copy_(k)
            self.values[layer][at:end].copy_(v)
            return
        for fresh, codes, scales in zip(
            (k, v), (self.keys[layer], self.values[layer]), self.scales[layer], strict=True
        ):
            for start in range(0, fresh.shape[0], STORE_CHUNK):
                stop = min(start + STORE_CHUNK, fresh.shape[0])
                x, scale = self.scratch[: stop - start], scales[at + start : at + stop]
                x.copy_(fresh[start:stop])
                torch.linalg.vector_norm(x, ord=float("inf"), dim=-1, out=scale)
                scale.div_(127).clamp_(min=torch.finfo(torch.float32).tiny)
                x.div_(scale[..., None]).round_().clamp_(-127, 127)
                codes[at + start : at + stop].copy_(x)

    def _cached(self, layer: int, which: int, first: int, last: int, dst: Tensor) -> None:
        """Positions [first, last) of layer's K (0) or V (1) into `dst`, dequantized if int8."""
        cached = (self.keys, self.values)[which][layer]
        if not self.int8:
            dst.copy_(cached[first:last])
            return
        for start in range(first, last, STORE_CHUNK):  # through the float32 scratch: no temporaries
            end = min(start + STORE_CHUNK, last)
            x = self.scratch[: end - start]
            torch.mul(cached[start:end], self.scales[layer][which][start:end, :, None], out=x)
            dst[start - first : end - first].copy_(x)

    def splice(self, layer: int, k: Tensor, v: Tensor, start: int, length: int, out: tuple[Tensor, Tensor]) -> None:
        """Write into `out` the `length` keys and values a window attends to: the cached ones, with
        the window's fresh (n, ...) K and V at positions [start, start + n)."""
        end = start + k.shape[0]
        for which, (fresh, dst) in enumerate(((k, out[0]), (v, out[1]))):
            self._cached(layer, which, 0, start, dst[:start])
            dst[start:end].copy_(fresh)
            self._cached(layer, which, end, length, dst[end:length])

    def release(self) -> None:
        self.keys, self.values, self.scales, self.scratch = [], [], [], None


@dataclass(frozen=True)
class CacheUse:
    """How one sequence of a step uses its cache: `refresh` runs the canvas from position 0 and
    stores positions [0, keep); otherwise the sequence is a window that starts at canvas position
    `start` of a canvas of `length` positions, attends to the cache, and stores its own first
    `keep` positions (block diffusion: the blocks finished since the last store).

    `block`: attention is block-causal over blocks of that many positions from 0 (block diffusion;
    0: bidirectional). The stored positions' queries then attend to the keys up to their own
    block's end (as the official prefill or store pass), the others (one block) to every key.
    `cache` None: nothing is kept (LLaDA2.x recomputes its whole prefix at every step): a refresh
    whose first `keep` positions attend block-causally all the same."""

    cache: BlockCache | None
    refresh: bool
    start: int = 0
    length: int = 0
    keep: int = 0
    block: int = 0


class Segment(NamedTuple):
    """Queries [first, last) of a sequence (its own positions) attend to canvas keys [0, keys);
    `block` > 0: block-causally (a query at canvas position p sees keys below the end of p's block
    of that many positions), which needs a mask; 0: every one of those keys."""

    first: int
    last: int
    keys: int
    block: int = 0


def segments(use: CacheUse | None, tokens: int) -> tuple[Segment, ...]:
    """The attention calls of a sequence of `tokens` positions that uses its cache as `use`: each
    one the official code makes (its queries, its key count), so that each keeps its bits."""
    keys = use.length if use is not None and not use.refresh else tokens
    if use is None or not use.block or not use.keep:
        return (Segment(0, tokens, keys),)
    stored = Segment(0, use.keep, use.start + use.keep, use.block if use.keep > use.block else 0)
    return (stored, Segment(use.keep, tokens, keys)) if use.keep < tokens else (stored,)


def block_causal_mask(first: int, queries: int, keys: int, block: int, dtype: torch.dtype, device) -> Tensor:
    """(queries, keys) additive mask of queries at canvas positions [first, first + queries):
    0 where a key is below the end of the query's block, -inf beyond (what SDPA makes of a bool
    mask). Filled block by block: nothing allocated but the mask itself."""
    mask = torch.full((queries, keys), float("-inf"), dtype=dtype, device=device)
    row = 0
    while row < queries:
        end = ((first + row) // block + 1) * block  # the canvas end of this row's block
        last = min(queries, end - first)  # the rows in that block
        mask[row:last, : min(end, keys)] = 0
        row = last
    return mask
