"""Whether the current step is a prediction: run on fake tensors (shapes, no values, no memory) to
learn its live-tensor timeline (`bench/step.py`). Code that would read values, or repeat identical
allocations thousands of times, asks here instead of inspecting tensors."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_PREDICTING: ContextVar[bool] = ContextVar("mosaic_predicting", default=False)


def is_predicting() -> bool:
    return _PREDICTING.get()


@contextmanager
def predicting() -> Iterator[None]:
    """Mark the work inside as a prediction."""
    token = _PREDICTING.set(True)
    try:
        yield
    finally:
        _PREDICTING.reset(token)
