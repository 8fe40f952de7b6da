"""What a step's memory depends on, as the planner, the executors and the scheduler share it: one
request's part of a step (`RequestShape`) and a whole step's symbols (`StepShape`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

from ..models.groups import Chunks
from ..models.kv_cache import BlockCache, CacheUse
from ..models.packing import Packing
from ..models.spec import ArchSpec

NO_CHUNKS = Chunks()


class RequestShape(NamedTuple):
    """One request's part of a step: its sequences (2 with CFG), their length (tokens run this
    step), the logits rows it reads, its sampler's temporary bytes per logits row, the bytes of its
    block cache (alive through the step), for a window attending to that cache, the canvas
    length its keys span (0: none), and the keys of its block-causal (masked) attention call, a
    block-diffusion prefill's (0: none)."""

    batch: int
    length: int
    rows: int
    sampler_row_bytes: int = 0
    cache_bytes: int = 0
    keys: int = 0
    masked_keys: int = 0


@dataclass(frozen=True)
class StepShape:
    """What a step's memory depends on: its sequences' lengths (a request contributes one, two with
    CFG; packed, so only the multiset matters: kept longest first), the most sequences of one
    request (`batch`, the LM head's rows per logits row), logits rows per chunk, the chunk counts of
    the other op groups, and the sampler's temporary bytes per logits row (the most of any request).
    Per-request facts travel here, never as executor attributes."""

    lengths: tuple[int, ...]
    batch: int
    chunk: int
    chunks: Chunks = NO_CHUNKS
    sampler_row_bytes: int = 0
    cache_keys: int = 0  # the longest canvas a window attends to through a block cache (0: no window)
    cache_bytes: int = 0  # block caches alive through the step (outside the arena)
    ranks: int = 1  # sequence-parallel ranks sharing the step's tokens: the shape of one rank's part
    tensor_ranks: int = 1  # tensor-parallel ranks sharing each linear weight's rows
    masked_keys: int = 0  # the most keys a block-causal (masked) attention call reads (0: none)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lengths", tuple(sorted(self.lengths, reverse=True)))

    @classmethod
    def of(
        cls, batch: int, length: int, chunk: int, chunks: Chunks = NO_CHUNKS, sampler_row_bytes: int = 0
    ) -> StepShape:
        """One request: `batch` sequences of `length` tokens."""
        return cls((length,) * batch, batch, chunk, chunks, sampler_row_bytes)

    @classmethod
    def packing(
        cls,
        requests: Sequence[RequestShape],
        row_chunk: int,
        chunks: Chunks = NO_CHUNKS,
        ranks: int = 1,
        tensor_ranks: int = 1,
    ) -> StepShape:
        """The step that runs `requests` together, logits rows bucketed for the most of any request."""
        return cls(
            tuple(r.length for r in requests for _ in range(r.batch)),
            max(r.batch for r in requests),
            chunk_bucket(max(r.rows for r in requests), row_chunk),
            chunks,
            max(r.sampler_row_bytes for r in requests),
            max(r.keys for r in requests),
            sum(r.cache_bytes for r in requests),
            ranks,
            tensor_ranks,
            max(r.masked_keys for r in requests),
        )

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def longest(self) -> int:
        return self.lengths[0]

    def alone(self, length: int) -> StepShape:
        """One request of this shape's guidance batch at `length` (what a max-length search varies);
        a block cache scaled with the length."""
        cache = -(-self.cache_bytes * length // self.longest)
        masked = max(0, length - (self.longest - self.masked_keys)) if self.masked_keys else 0
        return replace(self, lengths=(length,) * self.batch, cache_keys=0, cache_bytes=cache, masked_keys=masked)

    def trace_packing(self, spec: ArchSpec) -> Packing:
        """A packing of this shape: with windows, the shortest sequence is one, its canvas the longest
        window's; with a block-causal prefill, the longest sequence is one, masked over
        `masked_keys` (the buffers depend only on those lengths)."""
        uses: list[CacheUse | None] = [None] * len(self.lengths)
        if self.cache_keys:
            uses[-1] = CacheUse(BlockCache(spec, 0), refresh=False, length=self.cache_keys)
        if self.masked_keys:
            uses[0] = CacheUse(BlockCache(spec, 0), refresh=True, keep=self.masked_keys, block=1)
        return Packing(self.lengths, tuple(uses) if any(uses) else ())

    def describe(self) -> str:
        if self.masked_keys and len(self.lengths) == self.batch:
            return f"a block-diffusion prefill step of {self.longest} tokens"
        if len(self.lengths) == self.batch:
            return f"a denoising step at length {self.longest} (batch {self.batch})"
        return f"a batched step of {len(self.lengths)} sequences ({self.tokens} tokens, longest {self.longest})"


def chunk_bucket(rows: int, row_chunk: int) -> int:
    """Logits rows per chunk for `rows` rows: the next power of two, at most `row_chunk`.

    Bucketing keeps the number of distinct plans per generation small.
    """
    if rows < 1:
        raise ValueError(f"a step needs at least one row to sample, got {rows}")
    return min(row_chunk, 1 << math.ceil(math.log2(rows)))
