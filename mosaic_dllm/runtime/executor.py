"""What every executor offers the samplers and the engine, and the options that configure one.

An executor runs the one model description (`models/transformer.py`) with its kernels. A step asks
it for the logits of the hidden rows its sampler reads; the chunks it yields cover at least those
rows: the eager executor yields every row at once, as the official forward computes them; the
Mosaic executor exactly the requested rows, a chunk at a time, within the step's memory plan.

Several requests' steps may run together (`batch_logits`): the Mosaic executor packs them into one
forward pass whose arithmetic per token equals each request's alone; the eager executor (the
oracle) runs one official forward per request.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ..models.groups import CHUNKABLE_GROUPS, EXACT_GROUPS, Chunks
from ..models.kv_cache import CacheUse, segments
from ..models.spec import ArchSpec
from ..plan.shapes import RequestShape
from ..plan.step_plan import StepPlan

DEFAULT_ROW_CHUNK = 64
RowChunks = Iterator[tuple[Tensor, Tensor]]  # (hidden rows (C,), logits (B, C, V))
StepLogits = Callable[[], RowChunks]  # one request's row logits in a running step (callable again to re-read)


class StepInput(NamedTuple):
    """What one request's step needs from the executor: its canvas batch (B, L), the hidden rows it
    reads, and how it uses a block cache (then L is the window's tokens; see models/kv_cache.py)."""

    ids: Tensor
    rows: Tensor
    cache: CacheUse | None = None

    def shape(self, sampler_row_bytes: int, dtype: torch.dtype) -> RequestShape:
        use = self.cache
        keys = use.length if use is not None and not use.refresh else 0
        cache_bytes = use.cache.nbytes(dtype) if use is not None and use.cache is not None else 0
        masked = max((s.keys for s in segments(use, self.ids.shape[1]) if s.block), default=0)
        return RequestShape(*self.ids.shape, self.rows.numel(), sampler_row_bytes, cache_bytes, keys, masked)


@dataclass(frozen=True)
class ExecutorOptions:
    """Settings of the Mosaic executor (the eager one takes none: it runs as the official code)."""

    row_chunk: int = DEFAULT_ROW_CHUNK  # LM-head rows per chunk
    memory_budget: int | None = None  # bytes a step may use; None: plan, never search
    chunks: Chunks = field(default_factory=Chunks)  # forced chunk counts; the search only adds
    # Groups the search may split; "recompute" (not exact: within a stated tolerance) only if listed.
    chunk_groups: tuple[str, ...] = EXACT_GROUPS
    activations: str = "arena"  # "allocator": the same kernels, buffers from PyTorch (ablation)
    arena: str | None = None  # arena backing: "mmap" | "tensor" (default: by device)
    cache_size: int = 16  # plans and searches kept per executor

    def __post_init__(self) -> None:
        if self.activations not in ("arena", "allocator"):
            raise ValueError(f"activations must be 'arena' or 'allocator', got {self.activations!r}")
        unknown = set(self.chunk_groups) - set(CHUNKABLE_GROUPS)
        if unknown:
            raise ValueError(f"unknown chunk groups {sorted(unknown)}; choose from {', '.join(CHUNKABLE_GROUPS)}")
        if isinstance(self.row_chunk, bool) or not isinstance(self.row_chunk, int) or self.row_chunk < 1:
            raise ValueError(f"row_chunk must be an integer >= 1, got {self.row_chunk!r}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {self.memory_budget}")


class Executor(Protocol):
    name: str
    batch_invariant: bool  # a row's bits do not depend on what shares its forward pass
    spec: ArchSpec
    memory_budget: int | None  # None: unplanned or unbounded

    @property
    def dtype(self) -> torch.dtype: ...

    @property
    def arena_bytes(self) -> int:
        """Bytes the last step's plan used in the arena (0 when unplanned)."""

    @property
    def committed_bytes(self) -> int:
        """Arena bytes committed now (0 when unplanned)."""

    @property
    def last_plan(self) -> StepPlan | None: ...

    def plan_for(self, request: RequestShape) -> StepPlan | None:
        """The memory plan of one request's step (None for an unplanned executor); may raise
        DoesNotFit, naming the longest length that fits."""

    def plan_batch(self, requests: Sequence[RequestShape]) -> StepPlan | None:
        """The memory plan of a step running `requests` together; raises DoesNotFit (without the
        longest-length search) when it cannot fit."""

    def batch_logits(
        self, steps: Sequence[StepInput], sampler_row_bytes: int = 0, as_one_batch: bool = False
    ) -> AbstractContextManager[list[StepLogits]]:
        """Run one step of several requests; inside the context, the i-th callable yields request
        i's (hidden rows, (B, C, V) logits) chunks covering at least its rows. Consume each chunk
        before advancing, and every request's chunks before leaving the context. `as_one_batch`:
        the requests are one official batch (an evaluation's Monte Carlo copies)."""

    def row_logits(
        self, ids: Tensor, rows: Tensor, sampler_row_bytes: int = 0, cache: CacheUse | None = None
    ) -> RowChunks:
        """One request's step: `batch_logits` of one."""

    def release(self) -> None:
        """Give the request's activation memory back."""


def single_step(executor: Executor, step: StepInput, sampler_row_bytes: int = 0) -> RowChunks:
    """One request's step through `executor.batch_logits`."""
    with executor.batch_logits([step], sampler_row_bytes) as (logits,):
        yield from logits()
