"""Executors: interchangeable ways to run one model description."""

from __future__ import annotations

from ..models.spec import ArchSpec
from ..models.weights import Weights
from .eager import EagerExecutor
from .mosaic import MosaicExecutor

EXECUTORS = {"eager": EagerExecutor, "mosaic": MosaicExecutor}


def make_executor(name: str, spec: ArchSpec, weights: Weights, **options):
    if name not in EXECUTORS:
        raise ValueError(f"unknown executor {name!r}; available: {', '.join(EXECUTORS)}")
    return EXECUTORS[name](spec, weights, **options)


__all__ = ["EXECUTORS", "EagerExecutor", "MosaicExecutor", "make_executor"]
