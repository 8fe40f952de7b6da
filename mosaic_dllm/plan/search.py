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

Recompute (the "recompute" group, not exact) is searched only when the caller lists it, and only
after no exact split lowers the peak: it trades arithmetic for memory.

Which groups exist, what each splits and its smallest chunk come from the groups table
(`models/groups.py`). `longest` is the one max-length search (the Mosaic paper's sweep, then
bisection), used here for the floor and by the benchmarks for measured probes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ..device import KernelRules
from ..kernels.sequence_parallel import share
from ..memory.sizes import ceil_div, mib
from ..models.groups import CHUNKABLE_GROUPS, EXACT_GROUPS, MIN_CHUNK_TOKENS, OpGroup, largest_chunk
from .shapes import StepShape
from .step_plan import PlanCache, StepPlan

__all__ = [
    "CHUNKABLE_GROUPS",
    "EXACT_GROUPS",
    "MIN_CHUNK_TOKENS",
    "DoesNotFit",
    "fit",
    "floor",
    "longest",
    "max_length",
    "most_chunked",
]


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


def _rows(group: OpGroup, shape: StepShape) -> int:
    """What a chunk of `group` splits: every packed token (a rank's share of them), or (the longest)
    sequence's queries."""
    return shape.longest if group.splits == "queries" else share(shape.tokens, shape.ranks)


def _split(shape: StepShape, name: str, rules: KernelRules) -> StepShape | None:
    """The shape with group `name` in chunks half as large, or None if it cannot be split further."""
    group = rules.group(name)
    if group.splits == "rows":  # the logits: rows per chunk
        return replace(shape, chunk=shape.chunk // 2) if shape.chunk > group.min_chunk else None
    if group.splits is None:
        return None
    pieces, rows = getattr(shape.chunks, name), _rows(group, shape)
    current, limit = largest_chunk(rows, pieces, group), ceil_div(rows, group.min_chunk)
    more = pieces
    while current > group.min_chunk and more < limit:  # more pieces until the chunks shrink
        more = min(more * 2, limit)
        if largest_chunk(rows, more, group) < current:
            return replace(shape, chunks=replace(shape.chunks, **{name: more}))
    return None


def _usable(shape: StepShape, groups: tuple[str, ...]) -> tuple[str, ...]:
    """`groups` less recompute for a step with block caches (they keep every layer's K and V
    anyway, and a window's keys are the cache's) or over sequence-parallel ranks (their attention
    is one sharded region)."""
    return tuple(g for g in groups if g != "recompute" or not (shape.cache_bytes or shape.ranks > 1))


def most_chunked(shape: StepShape, groups: tuple[str, ...] = EXACT_GROUPS, *, rules: KernelRules) -> StepShape:
    """Every group in `groups` at its smallest chunk on the device of `rules`."""
    chunk, pieces = shape.chunk, {}
    for name in _usable(shape, groups):
        group = rules.group(name)
        if group.splits == "rows":
            chunk = group.min_chunk
        elif group.splits is not None:
            pieces[name] = max(1, ceil_div(_rows(group, shape), group.min_chunk))
    return replace(shape, chunk=chunk, chunks=replace(shape.chunks, **pieces))


def fit(
    plans: PlanCache,
    shape: StepShape,
    budget: int,
    groups: tuple[str, ...] = EXACT_GROUPS,
    explain: bool = True,
) -> SearchResult:
    """The first plan along the lazy search that fits `budget`, splitting only `groups`, or
    DoesNotFit (with the longest length that would fit when `explain`; a scheduler asking whether a
    batch fits skips that search). With "recompute" in `groups`, only once no exact split lowers
    the peak does the attention region switch to recomputing K and V (in its own query blocks)."""
    start = time.perf_counter()
    groups = _usable(shape, groups)
    plan, tried = plans.get(shape), 1
    while plan.predicted_peak_bytes > budget:
        better = None
        for _, group in plan.group_peaks():  # the peak's group first; others only if splitting it cannot help
            split = plan.graph.shape
            while better is None and group in groups and (split := _split(split, group, plans.rules)) is not None:
                candidate, tried = plans.get(split), tried + 1  # the smallest split that lowers the peak
                if candidate.predicted_peak_bytes < plan.predicted_peak_bytes:
                    better = candidate
            if better is not None:
                break
        split = plan.graph.shape
        if better is None and "recompute" in groups and split.chunks.recompute == 1:
            # the fewest query blocks whose recomputing region peaks lower than the exact floor
            while better is None and (split := _split(split, "recompute", plans.rules)) is not None:
                candidate, tried = plans.get(split), tried + 1
                if candidate.predicted_peak_bytes < plan.predicted_peak_bytes:
                    better = candidate
        if better is None:
            if not explain:
                raise DoesNotFit(f"{shape.describe()} does not fit the budget of {mib(budget)}", budget, None)
            raise _does_not_fit(plans, plan.graph.shape, plan, budget, groups)
        plan = better
    return SearchResult(plan, tried, time.perf_counter() - start)


LENGTH_LIMIT = 1 << 22  # the longest length a search tries: reaching it means "at least this long"


@dataclass
class LengthSearch:
    max_len: int  # 0 when even `start` does not fit
    probes: list[tuple[int, bool]] = field(default_factory=list)  # (length, fits) in probe order


def longest(
    fits: Callable[[int], bool], start: int = 2, step: int | None = None, limit: int = 1 << 22, precision: int = 1
) -> LengthSearch:
    """The longest length with `fits`: sweep start, start + step, ... (doubling when `step` is None)
    up to `limit`; at the first failure, bisect down to `precision` (the Mosaic paper's procedure).

    With a non-monotone probe the answer is the largest length that passed on the search path
    below the first failure; lengths above it are never probed. If nothing fails up to `limit`,
    the last length swept is the answer.
    """
    if start < 1 or (step is not None and step < 1) or precision < 1 or limit < start:
        raise ValueError("need start >= 1, step >= 1, precision >= 1 and limit >= start")
    result = LengthSearch(0)

    def probe(n: int) -> bool:
        ok = fits(n)
        result.probes.append((n, ok))
        return ok

    good, n = 0, start
    while n <= limit:
        if not probe(n):
            break
        good, n = n, (n + step if step else n * 2)
    else:
        result.max_len = good
        return result
    lo, hi = good, n  # lo fits (or 0), hi does not
    while hi - lo > precision:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if probe(mid) else (lo, mid)
    result.max_len = lo
    return result


def max_length(
    plans: PlanCache,
    shape: StepShape,
    budget: int,
    rows_at: Callable[[int], int],
    groups: tuple[str, ...] = EXACT_GROUPS,
    limit: int = LENGTH_LIMIT,
) -> int:
    """The longest sequence the search fits into `budget` chunking `groups` (0 if none); `rows_at(L)`
    gives the logits rows of a step at length L. The search decides, not the most-chunked plan:
    chunking attention into query blocks can raise a step's peak above a less chunked plan's."""

    def fits(length: int) -> bool:
        probe = replace(shape.alone(length), chunk=min(shape.chunk, rows_at(length)))
        try:
            fit(plans, probe, budget, groups, explain=False)
        except DoesNotFit:
            return False
        return True

    return longest(fits, limit=limit).max_len


def most_requests(
    plans: PlanCache, shape: StepShape, budget: int, groups: tuple[str, ...] = EXACT_GROUPS
) -> tuple[int, StepPlan | None]:
    """The most requests like `shape` (its one sequence, its block cache) one batched step can run
    within `budget`, chunking `groups` (what the scheduler's admission would let in together), and
    that batch's chosen plan (None when not even one fits)."""
    chosen: dict[int, StepPlan] = {}

    def fits(n: int) -> bool:
        many = replace(shape, lengths=shape.lengths * n, cache_bytes=shape.cache_bytes * n)
        try:
            chosen[n] = fit(plans, many, budget, groups, explain=False).plan
        except DoesNotFit:
            return False
        return True

    most = longest(fits, start=1, limit=1 << 16).max_len
    return most, chosen.get(most)


def floor(plans: PlanCache, shape: StepShape, groups: tuple[str, ...] = EXACT_GROUPS) -> StepPlan:
    """The lowest plan chunking can reach: every group at its smallest chunk, exact or (where
    allowed and lower) recomputing; grouped-query models' recompute floor is above the exact one."""
    exact = plans.get(most_chunked(shape, tuple(g for g in groups if g != "recompute"), rules=plans.rules))
    if "recompute" not in _usable(shape, groups):
        return exact
    recompute = plans.get(most_chunked(shape, groups, rules=plans.rules))
    return min(exact, recompute, key=lambda plan: plan.predicted_peak_bytes)


def _does_not_fit(
    plans: PlanCache, shape: StepShape, plan: StepPlan, budget: int, groups: tuple[str, ...]
) -> DoesNotFit:
    floor_bytes = min(floor(plans, shape, groups).predicted_peak_bytes, plan.predicted_peak_bytes)
    longest = max_length(plans, shape, budget, rows_at=lambda length: shape.chunk, groups=groups)
    message = (
        f"{shape.describe()} needs at least "
        f"{mib(floor_bytes)} of activation memory, more than the budget of {mib(budget)}: "
        f"the peak is at {plan.graph.ops[plan.peak_op]} ({plan.peak_group}), which cannot be chunked further. "
        + (
            f"The longest prefill step (the prompt's whole blocks and the first block) that fits this budget, "
            f"with a generation and a cache in the same proportion, is {longest} tokens; "
            if shape.masked_keys
            else f"The longest sequence (prompt + generation) that fits this budget is {longest} tokens; "
        )
        + "shorten the request or raise the memory budget."
    )
    with_recompute = (*groups, "recompute")
    if "recompute" not in groups and _usable(shape, with_recompute) == with_recompute:
        below = floor(plans, shape, with_recompute).predicted_peak_bytes
        if below <= budget:
            message += (
                f" Recomputing keys and values per query block would fit it ({mib(below)} at its "
                f"smallest, more compute, results within a tolerance of the exact ones): allow "
                f"recompute (LLM(allow_recompute=True), --allow-recompute)."
            )
    return DoesNotFit(message, floor_bytes, longest)
