"""The Mosaic executor: the same model description, planned into one arena, with mask-only logits.

A step asks for the logits of the rows its sampler reads (`row_logits`). The executor looks up the
plan for the step's shape (`planner.step_plan.PlanCache`: traced once per batch, length and logits
chunk bucket), makes the arena big enough, and runs `models.transformer` with `PlannedOps`, whose
every activation is a view at its planned offset. The LM head runs over the rows in chunks of
`row_chunk`, into one planned buffer, so no tensor of size L x V ever exists. `release` gives the
arena's memory back (the engine calls it when a request ends).

With a `memory_budget`, the plan of each step shape comes from the lazy chunking search
(`planner/search.py`): the fewest chunks whose predicted peak (arena, kernel workspace and the
sampler's temporaries) fits the budget; a shape that cannot fit raises `DoesNotFit` before any
work. Searches are cached per shape, so a generation searches a handful of times.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ..graph.trace import StepShape, chunk_bucket
from ..memory.arena import Arena, ArenaMemory
from ..models import transformer
from ..models.spec import ArchSpec
from ..models.weights import Weights
from ..planner.search import CHUNKABLE_GROUPS, SearchResult, fit
from ..planner.step_plan import PlanCache, StepPlan, device_alignment
from .planned_ops import AllocatorMemory, Chunks, PlannedOps

DEFAULT_ROW_CHUNK = 64


class MosaicExecutor:
    name = "mosaic"
    mask_only = True

    def __init__(
        self,
        spec: ArchSpec,
        weights: Weights,
        row_chunk: int = DEFAULT_ROW_CHUNK,
        memory_budget: int | None = None,
        chunks: Chunks | None = None,
        chunk_groups: tuple[str, ...] = CHUNKABLE_GROUPS,
        activations: str = "arena",
        arena: str | None = None,
    ):
        """`chunks` forces chunk counts (the search, with a budget, starts from them and only adds);
        `chunk_groups` limits which op groups the search may split; `activations="allocator"` runs
        the same ops with buffers from the PyTorch allocator instead of the arena plan (ablation)."""
        if activations not in ("arena", "allocator"):
            raise ValueError(f"activations must be 'arena' or 'allocator', got {activations!r}")
        unknown = set(chunk_groups) - set(CHUNKABLE_GROUPS)
        if unknown:
            raise ValueError(f"unknown chunk groups {sorted(unknown)}; choose from {', '.join(CHUNKABLE_GROUPS)}")
        if row_chunk < 1:
            raise ValueError(f"row_chunk must be >= 1, got {row_chunk}")
        if memory_budget is not None and memory_budget <= 0:
            raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget}")
        self.spec, self.weights, self.row_chunk, self.memory_budget = spec, weights, row_chunk, memory_budget
        self.chunks, self.chunk_groups, self.activations = chunks or Chunks(), tuple(chunk_groups), activations
        self.sampler_row_bytes = 0  # set per request from the sampler's measured cost
        self.searches: dict[StepShape, SearchResult] = {}
        self._planning = threading.Lock()
        device = weights.embed.device
        if arena is None and isinstance(weights.embed, FakeTensor):  # predicting: nothing may be mapped
            arena = "tensor"
        self.arena = Arena(device, backing=arena)
        self.plans = PlanCache(spec, self.dtype, device_alignment(device))
        self.last_plan: StepPlan | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    @property
    def arena_bytes(self) -> int:
        """Bytes the last step's plan used in the arena."""
        return self.last_plan.arena_bytes if self.last_plan and self.activations == "arena" else 0

    def plan_for(self, batch: int, length: int, rows: int, sampler_row_bytes: int | None = None) -> StepPlan:
        """The plan of a step over a (batch, length) canvas sampling `rows` rows (may raise DoesNotFit).

        Thread-safe: a server plans the next request while the current one runs.
        """
        sampler = self.sampler_row_bytes if sampler_row_bytes is None else sampler_row_bytes
        shape = StepShape(batch, length, chunk_bucket(rows, self.row_chunk), self.chunks, sampler)
        with self._planning:
            if self.memory_budget is None:
                return self.plans.get(shape)
            if shape not in self.searches:
                self.searches[shape] = fit(self.plans, shape, self.memory_budget, self.chunk_groups)
            return self.searches[shape].plan

    @torch.inference_mode()
    def row_logits(self, ids: Tensor, rows: Tensor) -> Iterator[tuple[slice, Tensor]]:
        """Yield (slice of `rows`, (B, C, V) logits) for hidden-state rows `rows` of canvas `ids`.

        The logits live in one arena buffer reused by the next chunk: consume them before advancing.
        No rows, no forward pass: nothing would read it.
        """
        if rows.numel() == 0:
            return
        plan = self.plan_for(ids.shape[0], ids.shape[1], rows.numel())
        if self.activations == "allocator":
            memory = AllocatorMemory(ids.device)
        else:
            if self.last_plan is not None and plan.arena_bytes < self.last_plan.arena_bytes:
                self.arena.trim(plan.arena_bytes)  # a smaller step follows a larger one
            memory = ArenaMemory(plan, self.arena)
        self.last_plan = plan
        ops = PlannedOps(memory, plan.graph.shape.chunks)
        hidden = transformer.hidden_states(ops, self.spec, self.weights, ids)
        yield from ops.lm_head_rows(hidden, self.weights.lm_head, rows, plan.graph.shape.chunk, name="lm_head")
        if isinstance(memory, ArenaMemory):
            memory.finish()

    def release(self) -> None:
        """Give the arena's memory back to the system (plans stay cached)."""
        self.arena.trim(0)
        self.last_plan = None
