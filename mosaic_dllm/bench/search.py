"""Longest sequence under a budget: a linear sweep, then a binary search after the first failure.

This is the Mosaic paper's max-length procedure; `fits` is any pass/fail probe (measured or predicted).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class SearchResult:
    max_len: int  # 0 when even `start` does not fit
    probes: list[tuple[int, bool]] = field(default_factory=list)  # (length, fits) in probe order


def max_length(fits: Callable[[int], bool], start: int, step: int, limit: int, precision: int) -> SearchResult:
    """Sweep start, start + step, ... up to `limit`; at the first failure, bisect down to `precision`.

    With a non-monotone probe the answer is the largest length that passed on the search path
    below the first failure; lengths above the first failure are never probed.
    """
    if start < 1 or step < 1 or precision < 1 or limit < start:
        raise ValueError("need start >= 1, step >= 1, precision >= 1 and limit >= start")
    result = SearchResult(0)

    def probe(n: int) -> bool:
        ok = fits(n)
        result.probes.append((n, ok))
        return ok

    good, bad = 0, None
    n = start
    while n <= limit:
        if not probe(n):
            bad = n
            break
        good, n = n, n + step
    if bad is None:
        result.max_len = good
        return result
    lo, hi = good, bad  # lo fits (or 0), hi does not
    while hi - lo > precision:
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    result.max_len = lo
    return result
