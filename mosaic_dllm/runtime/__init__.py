"""Executors: interchangeable ways to run one model description (`executor.Executor`)."""

from __future__ import annotations

from ..models.spec import ArchSpec
from ..models.weights import Weights
from .eager import EagerExecutor
from .executor import DEFAULT_ROW_CHUNK, Executor, ExecutorOptions
from .lead import LeadExecutor
from .mosaic import MosaicExecutor
from .parallel import (
    EagerSequenceParallelExecutor,
    EagerTensorParallelExecutor,
    SequenceParallelExecutor,
    TensorParallelExecutor,
)

PLANNED = {  # take ExecutorOptions
    "mosaic": MosaicExecutor,
    "sequence-parallel": SequenceParallelExecutor,
    "tensor-parallel": TensorParallelExecutor,
}
UNPLANNED = {
    "eager": EagerExecutor,
    "sequence-parallel-eager": EagerSequenceParallelExecutor,
    "tensor-parallel-eager": EagerTensorParallelExecutor,
}
PARALLEL = (  # across ranks
    "sequence-parallel",
    "tensor-parallel",
    "sequence-parallel-eager",
    "tensor-parallel-eager",
)
EXECUTORS = (*PLANNED, *UNPLANNED)


def check_executor(name: str, options: ExecutorOptions | None = None) -> None:
    """Refuse an unknown executor, or options the executor cannot honour (before any loading)."""
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")
    if name in UNPLANNED and options is not None and options != ExecutorOptions():
        raise ValueError(
            "a memory budget, chunks, row chunks, recompute or activation options: each needs the mosaic executor "
            f"(the {name} executor runs as the official code)"
        )


def make_executor(name: str, spec: ArchSpec, weights: Weights, options: ExecutorOptions | None = None) -> Executor:
    """The executor `name`; options apply to the Mosaic executor (the eager one runs as the official code)."""
    check_executor(name, options)
    return PLANNED[name](spec, weights, options) if name in PLANNED else UNPLANNED[name](spec, weights)


__all__ = [
    "DEFAULT_ROW_CHUNK",
    "EXECUTORS",
    "PARALLEL",
    "PLANNED",
    "EagerExecutor",
    "EagerSequenceParallelExecutor",
    "EagerTensorParallelExecutor",
    "Executor",
    "LeadExecutor",
    "ExecutorOptions",
    "MosaicExecutor",
    "SequenceParallelExecutor",
    "TensorParallelExecutor",
    "check_executor",
    "make_executor",
]
