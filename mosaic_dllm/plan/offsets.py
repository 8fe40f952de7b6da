"""Offset assignment behind one signature, a lower bound, an overlap validator and an ASCII map.

    (time) ->  0  1  2  3  4
    buffer a   [=====]            a: first 0, last 1
    buffer b      [========]      b: first 1, last 3
    buffer c               [==]   c: first 4, last 4  -> may reuse a's or b's bytes

Two buffers conflict when their inclusive lifetimes intersect; conflicting buffers must not share
bytes. Every algorithm returns offsets aligned to `alignment` and the arena size they need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..memory.sizes import align_up


@dataclass(frozen=True)
class Buffer:
    name: str
    size: int  # bytes
    first: int  # first op that writes or reads it (inclusive)
    last: int  # last op that reads it (inclusive)

    def __post_init__(self) -> None:
        if self.size < 0 or self.first > self.last:
            raise ValueError(f"buffer {self.name}: need size >= 0 and first <= last, got {self}")

    def overlaps_in_time(self, other: Buffer) -> bool:
        return self.first <= other.last and other.first <= self.last


@dataclass(frozen=True)
class Plan:
    offsets: dict[str, int]
    arena_bytes: int
    algorithm: str


class OverlapError(AssertionError):
    """Two simultaneously live buffers share bytes in a plan."""


def live_profile(buffers: Sequence[Buffer], ops: int, alignment: int = 1) -> list[int]:
    """Live (aligned) bytes at each of `ops` op indices."""
    delta = [0] * (ops + 1)
    for b in buffers:
        size = align_up(b.size, alignment)
        delta[b.first] += size
        delta[b.last + 1] -= size
    live, out = 0, []
    for t in range(ops):
        live += delta[t]
        out.append(live)
    return out


def lower_bound(buffers: Sequence[Buffer], alignment: int = 1) -> int:
    """The largest sum of simultaneously live (aligned) sizes: no plan can use less."""
    return max(live_profile(buffers, max((b.last for b in buffers), default=-1) + 1, alignment), default=0)


def _place(buffer: Buffer, size: int, placed: list[tuple[Buffer, int, int]], alignment: int, best_fit: bool) -> int:
    """Lowest (first fit) or tightest (best fit) aligned gap among time-overlapping placed buffers."""
    busy = sorted((off, off + sz) for b, off, sz in placed if b.overlaps_in_time(buffer) and sz)
    choice, choice_gap, cursor = None, None, 0
    for start, end in busy:
        gap = start - cursor
        if gap >= size and (choice is None or (best_fit and gap < choice_gap)):
            choice, choice_gap = cursor, gap
            if not best_fit:
                return choice
        cursor = max(cursor, align_up(end, alignment))
    return choice if choice is not None else cursor


def greedy_by_size_best_fit(buffers: Sequence[Buffer], alignment: int = 64) -> Plan:
    """Largest buffers first, each into the smallest gap that holds it (TFLite's greedy, XLA's best fit)."""
    return _greedy(sorted(buffers, key=lambda b: (-b.size, b.first, b.name)), alignment, True, "greedy_by_size")


def first_fit_in_order(buffers: Sequence[Buffer], alignment: int = 64) -> Plan:
    """In execution order, each at the lowest offset that fits (what the Mosaic release ships)."""
    return _greedy(sorted(buffers, key=lambda b: (b.first, -b.size, b.name)), alignment, False, "first_fit")


def greedy_by_breadth(buffers: Sequence[Buffer], alignment: int = 64) -> Plan:
    """The widest op first, its buffers largest first, each into the smallest gap (TFLite's greedy by breadth)."""
    ops = range(min((b.first for b in buffers), default=0), max((b.last for b in buffers), default=-1) + 1)
    live = {t: [b for b in buffers if b.first <= t <= b.last] for t in ops}
    breadth = {t: sum(b.size for b in bs) for t, bs in live.items()}
    order, seen = [], set()
    for t in sorted(ops, key=lambda t: (-breadth[t], t)):
        for b in sorted(live[t], key=lambda b: (-b.size, b.first, b.name)):
            if b.name not in seen:
                seen.add(b.name)
                order.append(b)
    return _greedy(order, alignment, True, "greedy_by_breadth")


def _greedy(order: list[Buffer], alignment: int, best_fit: bool, name: str) -> Plan:
    placed: list[tuple[Buffer, int, int]] = []
    offsets: dict[str, int] = {}
    arena = 0
    for b in order:
        size = align_up(b.size, alignment)
        offset = _place(b, size, placed, alignment, best_fit)
        placed.append((b, offset, size))
        offsets[b.name] = offset
        arena = max(arena, offset + size)
    return Plan(offsets, arena, name)


Algorithm = Callable[[Sequence[Buffer], int], Plan]
ALGORITHMS: dict[str, Algorithm] = {
    "greedy_by_size": greedy_by_size_best_fit,
    "greedy_by_breadth": greedy_by_breadth,
    "first_fit": first_fit_in_order,
}


def best_plan(buffers: Sequence[Buffer], alignment: int = 64, algorithms: Sequence[str] = tuple(ALGORITHMS)) -> Plan:
    """Run every algorithm and keep the smallest arena (ties: the first listed)."""
    plans = [ALGORITHMS[name](buffers, alignment) for name in algorithms]
    return min(plans, key=lambda p: p.arena_bytes)


def validate(
    buffers: Sequence[Buffer], plan: Plan, alignment: int = 1, aliases: frozenset[frozenset[str]] = frozenset()
) -> None:
    """Raise OverlapError if two time-overlapping buffers share bytes (O(N^2), for tests and checks)."""
    for b in buffers:
        off = plan.offsets[b.name]
        if off % alignment or off + b.size > plan.arena_bytes or off < 0:
            raise OverlapError(f"{b.name} at {off} (+{b.size}) is misaligned or outside the arena")
    for i, a in enumerate(buffers):
        for b in buffers[i + 1 :]:
            if not a.size or not b.size or not a.overlaps_in_time(b) or frozenset((a.name, b.name)) in aliases:
                continue
            oa, ob = plan.offsets[a.name], plan.offsets[b.name]
            if oa < ob + b.size and ob < oa + a.size:
                raise OverlapError(
                    f"{a.name} [{oa}, {oa + a.size}) and {b.name} [{ob}, {ob + b.size}) are live "
                    f"together (ops {max(a.first, b.first)}..{min(a.last, b.last)}) and overlap"
                )


SYMBOLS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


def ascii_map(buffers: Sequence[Buffer], plan: Plan, width: int = 64) -> str:
    """Time (rows) x offset (columns): which buffer holds each slice of the arena at each op."""
    if not buffers or not plan.arena_bytes:
        return "(empty plan)"
    scale = plan.arena_bytes / width
    symbols = {b.name: SYMBOLS[i % len(SYMBOLS)] for i, b in enumerate(buffers)}  # unique up to 62 buffers
    rows = []
    for t in range(min(b.first for b in buffers), max(b.last for b in buffers) + 1):
        row = ["."] * width
        for b in buffers:
            if b.first <= t <= b.last and b.size:
                lo = int(plan.offsets[b.name] / scale)
                hi = max(lo + 1, int((plan.offsets[b.name] + b.size) / scale))
                row[lo:hi] = symbols[b.name] * (hi - lo)
        rows.append(f"{t:>4} |{''.join(row)}|")
    legend = ", ".join(f"{s}={n}" for n, s in symbols.items())
    if len(symbols) > len(SYMBOLS):
        legend += f" (more than {len(SYMBOLS)} buffers: symbols repeat, in this order)"
    return "\n".join(rows + [f"arena {plan.arena_bytes} bytes ({plan.algorithm}); {legend}"])
