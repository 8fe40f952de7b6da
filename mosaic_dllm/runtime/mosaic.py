"""The Mosaic executor: the same model description, planned into one arena, with mask-only logits.

A step asks for the logits of the rows its sampler reads (`row_logits`; several requests together:
`batch_logits`, their sequences packed into one pass). The executor looks up the plan for the
step's shape (`plan.step_plan.PlanCache`: per sequence lengths and logits chunk bucket, so a steady
batch plans once), makes the arena big enough, and runs `models.transformer` with the planned kernels,
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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from ..device import KernelRules
from ..kernels.memory import AllocatorMemory
from ..kernels.planned import PlannedOps
from ..memory.arena import Arena
from ..memory.prediction import is_predicting
from ..models import transformer
from ..models.groups import Chunks
from ..models.kv_cache import CacheUse
from ..models.ops import RowHead
from ..models.packing import Packing
from ..models.spec import ArchSpec
from ..models.weights import Weights
from ..plan.search import DoesNotFit, SearchResult, fit
from ..plan.shapes import RequestShape, StepShape
from ..plan.step_plan import LRU, PlanCache, StepPlan
from .executor import ExecutorOptions, RowChunks, StepInput, StepLogits, single_step


class PlanMismatchError(AssertionError):
    """A step asked for a buffer its plan does not have: the trace and the run disagree."""


class ArenaMemory:
    """The `kernels.memory.Memory` that hands out a step plan's buffers, allocation by allocation,
    as views of the arena at their planned offsets, and checks each request against the plan."""

    tracing = False

    def __init__(self, plan: StepPlan, arena: Arena, rules: KernelRules):
        self.plan, self.arena, self.device, self.rules = plan, arena, arena.device, rules
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
    batch_invariant = True  # call sizes fixed by the device profile, never by the batch
    ranks = 1  # processes sharing each step's tokens (sequence parallel: `runtime/parallel.py`)
    tensor_ranks = 1  # processes sharing each linear weight's rows (tensor parallel)

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
        if backing is None and is_predicting():  # fake tensors: nothing may be mapped
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

    def plan_for(self, request: RequestShape) -> StepPlan:
        """The plan of one request's step (may raise DoesNotFit naming the longest length that fits).

        Thread-safe: a server plans the next request while the current one runs.
        """
        return self._plan([request], explain=True)

    def plan_batch(self, requests: Sequence[RequestShape]) -> StepPlan:
        """The plan of a step running `requests` together (DoesNotFit without the length search)."""
        return self._plan(requests, explain=False)

    def _plan(self, requests: Sequence[RequestShape], explain: bool) -> StepPlan:
        shape = StepShape.packing(requests, self.options.row_chunk, self.options.chunks, self.ranks, self.tensor_ranks)
        with self._planning:
            if self.memory_budget is None:
                return self.plans.get(shape)
            result: SearchResult | DoesNotFit | None = self.searches.lookup(shape)
            if result is None or (explain and isinstance(result, DoesNotFit) and result.max_length is None):
                try:
                    result = fit(self.plans, shape, self.memory_budget, self.options.chunk_groups, explain)
                except DoesNotFit as refused:
                    result = refused
                self.searches.put(shape, result)
            if isinstance(result, DoesNotFit):
                raise result
            return result.plan

    def row_logits(
        self, ids: Tensor, rows: Tensor, sampler_row_bytes: int = 0, cache: CacheUse | None = None
    ) -> RowChunks:
        """Yield (hidden rows, (B, C, V) logits) for hidden-state rows `rows` of canvas `ids`.

        The logits live in one arena buffer reused by the next chunk: consume them before advancing.
        No rows, no forward pass: nothing would read it.
        """
        return single_step(self, StepInput(ids, rows, cache), sampler_row_bytes)

    @contextmanager
    def batch_logits(
        self, steps: Sequence[StepInput], sampler_row_bytes: int = 0, as_one_batch: bool = False
    ) -> Iterator[list[StepLogits]]:
        """One packed forward pass for every request's canvas; request i's callable runs the LM head
        over its rows (again if called again, while the context is open). Packed or not, a row's
        bits are the same, so `as_one_batch` changes nothing here."""
        steps = [StepInput(*step) for step in steps]  # plain (ids, rows) tuples too
        reading = [i for i, step in enumerate(steps) if step.rows.numel()]
        logits: list[StepLogits] = [lambda: iter(()) for _ in steps]
        if not reading:  # no rows, no forward pass: nothing would read it
            yield logits
            return
        requests = [steps[i].shape(sampler_row_bytes, self.dtype) for i in reading]
        idle_caches = sum(s.shape(0, self.dtype).cache_bytes for s in steps if not s.rows.numel())
        requests[0] = requests[0]._replace(cache_bytes=requests[0].cache_bytes + idle_caches)  # alive all the same
        plan = self._plan(requests, explain=len(requests) == 1)
        head = self._forward(plan, [steps[i] for i in reading], requests)
        first = 0
        for i, r in zip(reading, requests, strict=True):
            logits[i] = self._reader(head, first, r.batch, steps[i].rows)
            first += r.batch
        yield logits

    @torch.inference_mode()
    def _forward(self, plan: StepPlan, steps: list[StepInput], requests: list[RequestShape]) -> RowHead:
        """The packed body of a step under its plan; returns its LM head."""
        if self.options.activations == "allocator":
            memory = AllocatorMemory(self.plans.rules)
        else:
            if self.last_plan is not None and plan.arena_bytes < self.last_plan.arena_bytes:
                self.arena.trim(plan.arena_bytes)  # a smaller step follows a larger one
            memory = ArenaMemory(plan, self.arena, self.plans.rules)
        self.last_plan = plan
        canvases = [step.ids for step in steps]
        ids = canvases[0].reshape(1, -1) if len(canvases) == 1 else torch.cat([c.reshape(-1) for c in canvases])[None]
        caches = tuple(s.cache for s, r in zip(steps, requests, strict=True) for _ in range(r.batch))
        transformer.check_uses(self.spec, caches)
        packing = Packing(tuple(r.length for r in requests for _ in range(r.batch)), caches if any(caches) else ())
        ops = self.planned_ops(memory, plan.graph.shape.chunks)
        shape = plan.graph.shape
        head = transformer.forward(ops, self.spec, self.weights, ids, packing, shape.batch, shape.chunk)
        if isinstance(memory, ArenaMemory):
            memory.finish()
        return head

    def planned_ops(self, memory: ArenaMemory | AllocatorMemory, chunks: Chunks) -> PlannedOps:
        """The kernels a step runs with (the trace of its plan uses the same: `plan/trace.py`)."""
        return PlannedOps(memory, chunks)

    @staticmethod
    def _reader(head: RowHead, first: int, count: int, rows: Tensor) -> StepLogits:
        @torch.inference_mode()
        def read() -> RowChunks:
            yield from head(first, count, rows)

        return read

    def release(self) -> None:
        """Give the arena's memory back to the system (plans stay cached)."""
        self.arena.trim(0)
        self.last_plan = None
