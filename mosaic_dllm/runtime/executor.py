"""What every executor offers the samplers and the engine, and the options that configure one.

An executor runs the one model description (`models/transformer.py`) with its kernels. A step asks
it for the logits of the hidden rows its sampler reads; the chunks it yields cover at least those
rows: the eager executor yields every row at once, as the official forward computes them; the
Mosaic executor exactly the requested rows, a chunk at a time, within the step's memory plan.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from ..models.groups import CHUNKABLE_GROUPS, Chunks
from ..models.spec import ArchSpec
from ..plan.step_plan import StepPlan

DEFAULT_ROW_CHUNK = 64
RowChunks = Iterator[tuple[Tensor, Tensor]]  # (hidden rows (C,), logits (B, C, V))


@dataclass(frozen=True)
class ExecutorOptions:
    """Settings of the Mosaic executor (the eager one takes none: it runs as the official code)."""

    row_chunk: int = DEFAULT_ROW_CHUNK  # LM-head rows per chunk
    memory_budget: int | None = None  # bytes a step may use; None: plan, never search
    chunks: Chunks = field(default_factory=Chunks)  # forced chunk counts; the search only adds
    chunk_groups: tuple[str, ...] = CHUNKABLE_GROUPS  # groups the search may split
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

    def plan_for(self, batch: int, length: int, rows: int, sampler_row_bytes: int = 0) -> StepPlan | None:
        """The memory plan of a step (None for an unplanned executor); may raise DoesNotFit."""

    def row_logits(self, ids: Tensor, rows: Tensor, sampler_row_bytes: int = 0) -> RowChunks:
        """(hidden rows, (B, C, V) logits) chunks covering at least `rows` of canvas `ids` (B, L);
        consume each chunk before advancing."""

    def release(self) -> None:
        """Give the request's activation memory back."""
