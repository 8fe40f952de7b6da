"""The Mosaic executor: the same model description, planned into one arena, with mask-only logits.

A step asks for the logits of the rows its sampler reads (`row_logits`). The executor looks up the
plan for the step's shape (`plan.step_plan.PlanCache`: traced once per batch, length and logits
chunk bucket), makes the arena big enough, and runs `models.transformer` with the planned kernels,
whose every activation is a view at its planned offset (`ArenaMemory`). The LM head runs over the
rows in chunks of `row_chunk`, into one planned buffer, so no tensor of size L x V ever exists.
`release` gives the arena's memory back (the engine calls it when a request ends).

With a `memory_budget`, the plan of each step shape comes from the lazy chunking search
(`plan/search.py`): the fewest chunks whose predicted peak (arena, kernel workspace and the
sampler's temporaries) fits the budget; a shape that cannot fit raises `DoesNotFit` before any
work. Plans and searches are cached per shape (bounded), so a generation searches a handful of times.
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import FakeTensor

from ..kernels.planned import AllocatorMemory, PlannedOps
from ..memory.arena import Arena
from ..models import transformer
from ..models.spec import ArchSpec
from ..models.weights import Weights
from ..plan.search import SearchResult, fit
from ..plan.step_plan import LRU, PlanCache, StepPlan
from ..plan.trace import StepShape, chunk_bucket
from .executor import ExecutorOptions, RowChunks


class PlanMismatchError(AssertionError):
    """A step asked for a buffer its plan does not have: the trace and the run disagree."""


class ArenaMemory:
    """The `kernels.planned.Memory` that hands out a step plan's buffers, allocation by allocation,
    as views of the arena at their planned offsets, and checks each request against the plan."""

    tracing = False

    def __init__(self, plan: StepPlan, arena: Arena):
        self.plan, self.arena, self.device = plan, arena, arena.device
        self.allocations = 0
        arena.ensure(plan.arena_bytes)

    def op(self, name: str, group: str, *reads: Tensor) -> None:
        pass

    def workspace(self, nbytes: int) -> None:
        pass

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        graph = self.plan.graph
        if self.allocations >= graph.allocations_per_step:
            raise PlanMismatchError(f"allocation {self.allocations} is beyond the plan's {graph.allocations_per_step}")
        index = graph.template_index(self.allocations)
        planned = graph.buffers[index]
        if planned.shape != tuple(shape) or planned.dtype != dtype:
            raise PlanMismatchError(
                f"allocation {self.allocations} asks for {tuple(shape)} {dtype}, the plan has "
                f"{planned.shape} {planned.dtype} (written by {graph.ops[planned.op]})"
            )
        self.allocations += 1
        return self.arena.view(self.plan.offset(index), tuple(shape), dtype)

    def finish(self) -> None:
        if self.allocations != self.plan.graph.allocations_per_step:
            raise PlanMismatchError(
                f"the step made {self.allocations} allocations, its plan {self.plan.graph.allocations_per_step}"
            )


class MosaicExecutor:
    name = "mosaic"

    def __init__(self, spec: ArchSpec, weights: Weights, options: ExecutorOptions | None = None):
        """`options.chunks` forces chunk counts (the search, with a budget, starts from them and only
        adds); `options.chunk_groups` limits which op groups the search may split;
        `options.activations="allocator"` runs the same kernels with buffers from the PyTorch
        allocator instead of the arena plan (ablation)."""
        self.spec, self.weights, self.options = spec, weights, options or ExecutorOptions()
        self.memory_budget = self.options.memory_budget
        self.searches: LRU = LRU(self.options.cache_size)
        self._planning = threading.Lock()
        device = weights.embed.device
        backing = self.options.arena
        if backing is None and isinstance(weights.embed, FakeTensor):  # predicting: nothing may be mapped
            backing = "tensor"
        self.arena = Arena(device, backing=backing)
        self.plans = PlanCache(spec, self.dtype, device, self.options.cache_size)
        self.last_plan: StepPlan | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    @property
    def arena_bytes(self) -> int:
        return self.last_plan.arena_bytes if self.last_plan and self.options.activations == "arena" else 0

    @property
    def committed_bytes(self) -> int:
        return self.arena.touched_bytes

    def plan_for(self, batch: int, length: int, rows: int, sampler_row_bytes: int = 0) -> StepPlan:
        """The plan of a step over a (batch, length) canvas sampling `rows` rows (may raise DoesNotFit).

        Thread-safe: a server plans the next request while the current one runs.
        """
        chunk = chunk_bucket(rows, self.options.row_chunk)
        shape = StepShape(batch, length, chunk, self.options.chunks, sampler_row_bytes)
        with self._planning:
            if self.memory_budget is None:
                return self.plans.get(shape)
            result: SearchResult | None = self.searches.lookup(shape)
            if result is None:
                result = fit(self.plans, shape, self.memory_budget, self.options.chunk_groups)
                self.searches.put(shape, result)
            return result.plan

    @torch.inference_mode()
    def row_logits(self, ids: Tensor, rows: Tensor, sampler_row_bytes: int = 0) -> RowChunks:
        """Yield (hidden rows, (B, C, V) logits) for hidden-state rows `rows` of canvas `ids`.

        The logits live in one arena buffer reused by the next chunk: consume them before advancing.
        No rows, no forward pass: nothing would read it.
        """
        if rows.numel() == 0:
            return
        plan = self.plan_for(ids.shape[0], ids.shape[1], rows.numel(), sampler_row_bytes)
        if self.options.activations == "allocator":
            memory = AllocatorMemory(ids.device)
        else:
            if self.last_plan is not None and plan.arena_bytes < self.last_plan.arena_bytes:
                self.arena.trim(plan.arena_bytes)  # a smaller step follows a larger one
            memory = ArenaMemory(plan, self.arena)
        self.last_plan = plan
        ops = PlannedOps(memory, plan.graph.shape.chunks)
        yield from transformer.logits(ops, self.spec, self.weights, ids, rows, plan.graph.shape.chunk)
        if isinstance(memory, ArenaMemory):
            memory.finish()

    def release(self) -> None:
        """Give the arena's memory back to the system (plans stay cached)."""
        self.arena.trim(0)
        self.last_plan = None
