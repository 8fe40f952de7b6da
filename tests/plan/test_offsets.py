"""Offset planners: valid on random lifetimes, never below the lower bound, and tight on known cases."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_dllm.plan.offsets import (
    ALGORITHMS,
    Buffer,
    OverlapError,
    Plan,
    ascii_map,
    best_plan,
    lower_bound,
    validate,
)


@st.composite
def buffer_sets(draw):
    n = draw(st.integers(1, 30))
    out = []
    for i in range(n):
        first = draw(st.integers(0, 40))
        out.append(Buffer(f"b{i}", draw(st.integers(0, 5000)), first, first + draw(st.integers(0, 15))))
    return out


@settings(max_examples=300, deadline=None)
@given(buffer_sets(), st.sampled_from([1, 8, 64]))
def test_every_algorithm_gives_a_valid_plan_at_or_above_the_lower_bound(buffers, alignment):
    bound = lower_bound(buffers, alignment)
    plans = [ALGORITHMS[name](buffers, alignment) for name in ALGORITHMS]
    for plan in plans:
        validate(buffers, plan, alignment)
        assert plan.arena_bytes >= bound
    best = best_plan(buffers, alignment)
    assert best.arena_bytes == min(p.arena_bytes for p in plans)


def test_chain_of_lifetimes_reuses_memory():
    # a -> b -> c, each alive for two ops: two buffers at a time at most
    buffers = [Buffer("a", 100, 0, 1), Buffer("b", 100, 1, 2), Buffer("c", 100, 2, 3)]
    plan = best_plan(buffers, alignment=1)
    validate(buffers, plan)
    assert lower_bound(buffers) == 200 and plan.arena_bytes == 200
    assert plan.offsets["a"] == plan.offsets["c"]


def test_greedy_beats_first_fit_where_order_fragments():
    # first fit in execution order strands a hole that greedy-by-size avoids
    buffers = [Buffer("small", 10, 0, 1), Buffer("big1", 100, 1, 2), Buffer("big2", 100, 2, 3), Buffer("mid", 60, 3, 4)]
    greedy = ALGORITHMS["greedy_by_size"](buffers, 1)
    first = ALGORITHMS["first_fit"](buffers, 1)
    for plan in (greedy, first):
        validate(buffers, plan)
    assert greedy.arena_bytes <= first.arena_bytes
    assert best_plan(buffers, 1).arena_bytes == min(greedy.arena_bytes, first.arena_bytes)


def test_validator_catches_overlap_and_accepts_declared_aliases():
    buffers = [Buffer("x", 64, 0, 2), Buffer("y", 64, 1, 3)]
    bad = Plan({"x": 0, "y": 32}, 96, "hand")
    with pytest.raises(OverlapError, match="x .* y .* live together"):
        validate(buffers, bad)
    validate(buffers, Plan({"x": 0, "y": 0}, 64, "hand"), aliases=frozenset({frozenset({"x", "y"})}))
    with pytest.raises(OverlapError, match="outside the arena"):
        validate(buffers, Plan({"x": 0, "y": 64}, 100, "hand"))


def test_ascii_map_shows_every_op():
    buffers = [Buffer("a", 100, 0, 1), Buffer("b", 100, 1, 2)]
    text = ascii_map(buffers, best_plan(buffers, 1), width=20)
    assert text.count("\n") == 3 and "a=a" in text and "b=b" in text


def test_bad_buffer_rejected():
    with pytest.raises(ValueError, match="first <= last"):
        Buffer("z", 10, 5, 4)
