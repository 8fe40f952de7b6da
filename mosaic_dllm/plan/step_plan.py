"""One reuse plan per step shape: trace the op graph, hand its lifetimes to the offset planners.

The offset algorithms (`offsets.py`) see only `Buffer`s; this module turns a traced `StepGraph`
into buffers, keeps the smaller of the algorithms' arenas, and reports what the plan costs: arena
bytes, the lower bound no plan can beat, the op (and op group) where live bytes peak, the kernel
workspace outside the arena, and the planning time. `PlanCache` keys plans by `StepShape`, so a
generation plans once per distinct (sequence lengths, logits chunk bucket); its `StepTracer` traces
once per graph structure and evaluates sizes for the rest.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..device import DeviceProfile, profile_for
from ..models.groups import BY_NAME
from ..models.spec import ArchSpec
from .offsets import Buffer, Plan, best_plan, live_profile, validate
from .shapes import StepShape
from .symbolic import StepTracer
from .trace import StepGraph, trace_step


def device_alignment(device: torch.device) -> int:
    """Offsets aligned for vector loads (64-byte cache lines on CPUs, 256 bytes on CUDA)."""
    return 256 if device.type == "cuda" else 64


@dataclass
class StepPlan:
    graph: StepGraph
    plan: Plan
    buffers: list[Buffer]
    lower_bound_bytes: int  # the largest sum of simultaneously live (aligned) buffers
    peak_op: int  # op index where planned live bytes plus workspace peak
    op_bytes: list[int]  # per op: live (aligned) buffer bytes plus that op's workspace
    workspace_bytes: int  # the largest kernel workspace outside the arena, at any op
    planning_seconds: float

    @property
    def arena_bytes(self) -> int:
        return self.plan.arena_bytes

    @property
    def predicted_peak_bytes(self) -> int:
        """Arena plus the largest transient workspace (kernel outputs, MoE experts, the sampler's
        temporaries) plus the block caches alive through the step."""
        return self.arena_bytes + self.workspace_bytes + self.graph.shape.cache_bytes

    @property
    def peak_group(self) -> str:
        return self.graph.group(self.peak_op)

    def group_peaks(self) -> list[tuple[int, str]]:
        """(largest live bytes plus workspace at its ops, group), largest first."""
        peaks: dict[str, int] = {}
        for t, n in enumerate(self.op_bytes):
            group = self.graph.group(t)
            peaks[group] = max(peaks.get(group, 0), n)
        return sorted(((n, g) for g, n in peaks.items()), reverse=True)

    def offset(self, buffer: int) -> int:
        return self.plan.offsets[str(buffer)]

    def summary(self) -> dict:
        g = self.graph
        return {
            "batch": g.shape.batch,
            "length": g.shape.longest,
            "sequences": len(g.shape.lengths),
            "tokens": g.shape.tokens,
            "arena_bytes": self.arena_bytes,
            "lower_bound_bytes": self.lower_bound_bytes,
            "arena_vs_lower_bound": round(self.arena_bytes / self.lower_bound_bytes, 4),
            "algorithm": self.plan.algorithm,
            "peak_op": g.ops[self.peak_op],
            "peak_group": self.peak_group,
            "workspace_bytes": self.workspace_bytes,
            "cache_bytes": g.shape.cache_bytes,
            "predicted_peak_activation_bytes": self.predicted_peak_bytes,
            # an inexact group (recompute) is shown only when it runs
            "chunks": {"logits_rows": g.shape.chunk}
            | {k: n for k, n in g.shape.chunks.as_dict().items() if n > 1 or BY_NAME[k].exact},
            "buffers": len(self.buffers),
            "planned_layers": f"{g.repeats} x 1 layer template" if g.repeats > 1 else "every layer",
            "planning_seconds": round(self.planning_seconds, 6),
        }


def plan_step(
    spec: ArchSpec,
    dtype: torch.dtype,
    shape: StepShape,
    alignment: int = 64,
    check: bool = False,
    tracer: StepTracer | None = None,
) -> StepPlan:
    """Trace (or, with a `tracer`, evaluate) and plan one step; `check` also runs the (quadratic)
    overlap validator."""
    start = time.perf_counter()
    graph = tracer.graph(shape) if tracer is not None else trace_step(spec, dtype, shape)  # this CPU's rules
    buffers = [Buffer(str(b.index), b.nbytes, b.op, b.last) for b in graph.buffers]
    plan = best_plan(buffers, alignment)
    profile = live_profile(buffers, len(graph.ops), alignment)
    with_workspace = [live + graph.workspace.get(t, 0) for t, live in enumerate(profile)]
    seconds = time.perf_counter() - start
    if check:
        validate(buffers, plan, alignment)
    return StepPlan(
        graph=graph,
        plan=plan,
        buffers=buffers,
        lower_bound_bytes=max(profile),
        peak_op=max(range(len(with_workspace)), key=with_workspace.__getitem__),
        op_bytes=with_workspace,
        workspace_bytes=max(graph.workspace.values(), default=0),
        planning_seconds=seconds,
    )


class LRU(OrderedDict):
    """A mapping that keeps its `capacity` most recently used entries."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity

    def lookup(self, key):
        """The value for `key` (marked as just used), or None."""
        if key not in self:
            return None
        self.move_to_end(key)
        return self[key]

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.capacity:
            self.popitem(last=False)


class PlanCache:
    """Plans by step shape, least recently used evicted first; counts plans made and time spent."""

    def __init__(
        self,
        spec: ArchSpec,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        capacity: int = 16,
        profile: DeviceProfile | None = None,
    ):
        """Plans for `device` as this machine's profile of it says, or as a saved `profile` says."""
        profile = profile or profile_for(device)
        self.spec, self.dtype, self.alignment = spec, dtype, device_alignment(profile.device)
        self.rules = profile.rules(dtype)
        self._plans: LRU = LRU(capacity)
        self.tracer = StepTracer(spec, dtype, self.rules)
        self.plans_made = 0
        self.planning_seconds = 0.0

    def get(self, shape: StepShape) -> StepPlan:
        plan = self._plans.lookup(shape)
        if plan is None:
            plan = plan_step(self.spec, self.dtype, shape, self.alignment, tracer=self.tracer)
            self.plans_made += 1
            self.planning_seconds += plan.planning_seconds
            self._plans.put(shape, plan)
        return plan
