"""Offset planning: pure functions from buffer lifetimes to offsets in one arena.

The algorithms know nothing about models or graphs (as in TFLite's memory planner and XLA's heap
simulator): they take `Buffer`s (size, first and last use, inclusive) and return a `Plan`.
"""

from .offsets import (
    ALGORITHMS,
    Buffer,
    OverlapError,
    Plan,
    ascii_map,
    best_plan,
    first_fit_in_order,
    greedy_by_size_best_fit,
    lower_bound,
    validate,
)

__all__ = [
    "ALGORITHMS",
    "Buffer",
    "OverlapError",
    "Plan",
    "ascii_map",
    "best_plan",
    "first_fit_in_order",
    "greedy_by_size_best_fit",
    "lower_bound",
    "validate",
]
