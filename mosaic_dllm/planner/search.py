"""Lazy chunking: split only the op group at the peak, only as much as needed, until the step fits.

Start from the unchunked plan. While its predicted peak (arena + the largest transient workspace,
the sampler's included) exceeds the budget, look at the op group that holds the peak and halve its
chunk size (double its chunk count; the logits chunk halves its rows) until the predicted peak
drops; re-plan. (One halving may not be enough: chunking the norm and projections into two
chunks fuses them into one op whose scratch of half the length is live with q, k and v, and the
arena can exceed the live peak where offsets fragment.) If no split of that group lowers the
peak, the group with the next-highest peak is tried. Stop at the
first plan that fits: it has the fewest chunks the search could find, so GEMMs stay as large as
the budget allows. If no split lowers the peak (it sits in projections, the residual stream or
groups already at their smallest chunk), the step cannot fit: `DoesNotFit` names the floor and
the longest sequence that would fit.

Chunk sizes never go below `MIN_CHUNK_TOKENS` tokens (query rows for attention): below that a
GEMM's per-call overhead dominates (see benchmarks/README.md for the measured cost).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..graph.trace import StepShape
from .step_plan import PlanCache, StepPlan

MIN_CHUNK_TOKENS = 32
GROUP_FIELD = {
    "norms": "norms",
    "attention": "attention",
    "ffn": "ffn",
    "moe": "ffn",
    "qkv_projections": "projections",
    "output_projection": "projections",
}
CHUNKABLE_GROUPS = ("logits", "norms", "attention", "ffn", "moe", "qkv_projections", "output_projection")


class DoesNotFit(ValueError):
    """A step cannot fit the memory budget with any chunking the search can pick."""

    def __init__(self, message: str, floor_bytes: int, max_length: int | None):
        super().__init__(message)
        self.floor_bytes, self.max_length = floor_bytes, max_length


@dataclass
class SearchResult:
    plan: StepPlan
    plans_tried: int
    seconds: float


def _tokens(group: str, shape: StepShape) -> int:
    return shape.length if group == "attention" else shape.batch * shape.length


def _split(shape: StepShape, group: str) -> StepShape | None:
    """The shape with `group` in twice as many pieces, or None if it cannot be split further."""
    if group == "logits":
        return replace(shape, chunk=shape.chunk // 2) if shape.chunk > 1 else None
    field = GROUP_FIELD.get(group)
    if field is None:
        return None
    pieces = getattr(shape.chunks, field)
    tokens = _tokens(group, shape)
    if -(-tokens // pieces) <= MIN_CHUNK_TOKENS:
        return None
    more = min(pieces * 2, -(-tokens // MIN_CHUNK_TOKENS))
    return replace(shape, chunks=replace(shape.chunks, **{field: more}))


def most_chunked(shape: StepShape, groups: tuple[str, ...] = CHUNKABLE_GROUPS) -> StepShape:
    """Every group in `groups` at its smallest chunk: the floor of what chunking them can reach."""
    pieces = {f: max(1, -(-_tokens(g, shape) // MIN_CHUNK_TOKENS)) for g, f in GROUP_FIELD.items() if g in groups}
    return replace(shape, chunk=1 if "logits" in groups else shape.chunk, chunks=replace(shape.chunks, **pieces))


def fit(plans: PlanCache, shape: StepShape, budget: int, groups: tuple[str, ...] = CHUNKABLE_GROUPS) -> SearchResult:
    """The first plan along the lazy search that fits `budget`, splitting only `groups`, or DoesNotFit."""
    start = time.perf_counter()
    plan, tried = plans.get(shape), 1
    while plan.predicted_peak_bytes > budget:
        better = None
        for _, group in plan.group_peaks():  # the peak's group first; others only if splitting it cannot help
            split = plan.graph.shape
            while better is None and group in groups and (split := _split(split, group)) is not None:
                candidate, tried = plans.get(split), tried + 1  # the smallest split that lowers the peak
                if candidate.predicted_peak_bytes < plan.predicted_peak_bytes:
                    better = candidate
            if better is not None:
                break
        if better is None:
            raise _does_not_fit(plans, plan.graph.shape, plan, budget, groups)
        plan = better
    return SearchResult(plan, tried, time.perf_counter() - start)


def longest(fits: Callable[[int], bool], limit: int = 1 << 22, precision: int = 1) -> int:
    """The largest n <= limit with fits(n), for a monotone probe: doubling, then bisection (0 if none)."""
    lo, hi = 0, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > precision:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def max_length(
    plans: PlanCache,
    shape: StepShape,
    budget: int,
    rows_at: Callable[[int], int],
    groups: tuple[str, ...] = CHUNKABLE_GROUPS,
    limit: int = 1 << 22,
) -> int:
    """The longest sequence whose most-chunked step (chunking `groups`) fits `budget` (0 if none);
    `rows_at(L)` gives the logits rows of a step at length L. Feasibility only grows with chunking,
    so the floor decides."""

    def fits(length: int) -> bool:
        probe = most_chunked(replace(shape, length=length, chunk=min(shape.chunk, rows_at(length))), groups)
        return plans.get(probe).predicted_peak_bytes <= budget

    return longest(fits, limit)


def _does_not_fit(
    plans: PlanCache, shape: StepShape, plan: StepPlan, budget: int, groups: tuple[str, ...]
) -> DoesNotFit:
    floor = plans.get(most_chunked(shape, groups))
    floor_bytes = min(floor.predicted_peak_bytes, plan.predicted_peak_bytes)
    longest = max_length(plans, shape, budget, rows_at=lambda length: shape.chunk, groups=groups)
    mib = lambda n: f"{n / 2**20:,.1f} MiB"  # noqa: E731
    message = (
        f"a denoising step at length {shape.length} (batch {shape.batch}) needs at least "
        f"{mib(floor_bytes)} of activation memory, more than the budget of {mib(budget)}: "
        f"the peak is at {plan.graph.ops[plan.peak_op]} ({plan.peak_group}), which cannot be chunked further. "
        f"The longest sequence (prompt + generation) that fits this budget is {longest} tokens; "
        f"shorten the request or raise the memory budget."
    )
    return DoesNotFit(message, floor_bytes, longest)
