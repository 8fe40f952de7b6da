"""The eager executor: the model description with the eager kernels. The baseline and the oracle.

Fresh tensors from the PyTorch allocator and full (B, L, V) logits, exactly as the official code:
whatever rows a sampler asks for, it gets every row in one chunk and samples over all of them,
float64 casts included.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

from ..kernels.eager import EagerOps
from ..models import transformer
from ..models.spec import ArchSpec
from ..models.weights import Weights
from ..plan.step_plan import StepPlan
from ..plan.trace import RequestShape
from .executor import CanvasRows, RowChunks, StepLogits


class EagerExecutor:
    name = "eager"
    memory_budget = None
    arena_bytes = 0
    committed_bytes = 0
    last_plan: StepPlan | None = None

    def __init__(self, spec: ArchSpec, weights: Weights):
        self.spec, self.weights, self.ops = spec, weights, EagerOps()

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def plan_for(self, batch: int, length: int, rows: int, sampler_row_bytes: int = 0) -> None:
        """Unplanned: activations come from the allocator as the official code makes them."""
        return None

    def plan_batch(self, requests: Sequence[RequestShape]) -> None:
        return None

    @contextmanager
    def batch_logits(self, steps: Sequence[CanvasRows], sampler_row_bytes: int = 0) -> Iterator[list[StepLogits]]:
        """One official forward per request, run when its logits are read."""
        yield [lambda ids=ids, rows=rows: self.row_logits(ids, rows) for ids, rows in steps]

    @torch.inference_mode()
    def row_logits(self, ids: Tensor, rows: Tensor, sampler_row_bytes: int = 0) -> RowChunks:
        """Every row's logits in one chunk, whatever `rows` asks for (the official forward)."""
        yield from transformer.logits(self.ops, self.spec, self.weights, ids)

    @torch.inference_mode()
    def logits(self, ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, V) logits for every position."""
        return next(transformer.logits(self.ops, self.spec, self.weights, ids))[1]

    def release(self) -> None:
        """Nothing to give back: every activation was a fresh tensor, freed when the step ended."""
