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
from ..models.kv_cache import CacheUse
from ..models.spec import ArchSpec
from ..models.weights import Weights
from ..plan.shapes import RequestShape
from ..plan.step_plan import StepPlan
from .executor import RowChunks, StepInput, StepLogits


class EagerExecutor:
    name = "eager"
    batch_invariant = False  # the official arithmetic: a GEMM's rows may round by the call's size
    memory_budget = None
    arena_bytes = 0
    committed_bytes = 0
    last_plan: StepPlan | None = None

    def __init__(self, spec: ArchSpec, weights: Weights):
        self.spec, self.weights, self.ops = spec, weights, EagerOps(spec.float_logits)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    def plan_for(self, request: RequestShape) -> None:
        """Unplanned: activations come from the allocator as the official code makes them."""
        return None

    def plan_batch(self, requests: Sequence[RequestShape]) -> None:
        return None

    @contextmanager
    def batch_logits(
        self, steps: Sequence[StepInput], sampler_row_bytes: int = 0, as_one_batch: bool = False
    ) -> Iterator[list[StepLogits]]:
        """One official forward per request, run when its logits are read; `as_one_batch`: one
        forward over every request's sequences, laid out as an official evaluation batches its
        copies (every request's first sequence, then every request's second: the guidance half)."""
        steps = [StepInput(*step) for step in steps]  # plain (ids, rows) tuples too
        if not (as_one_batch and steps and _stackable(steps)):
            yield [lambda s=step: self.row_logits(s.ids, s.rows, cache=s.cache) for step in steps]
            return
        n, per = len(steps), steps[0].ids.shape[0]
        logits = self.logits(torch.cat([s.ids[j : j + 1] for j in range(per) for s in steps]))
        rows = torch.arange(logits.shape[1], device=logits.device)
        yield [lambda i=i: iter([(rows, logits[i::n])]) for i in range(n)]

    @torch.inference_mode()
    def row_logits(
        self, ids: Tensor, rows: Tensor, sampler_row_bytes: int = 0, cache: CacheUse | None = None
    ) -> RowChunks:
        """Every row's logits in one chunk, whatever `rows` asks for (the official forward; with a
        block cache, Fast-dLLM's cached forward)."""
        yield from transformer.logits(self.ops, self.spec, self.weights, ids, cache=cache)

    @torch.inference_mode()
    def logits(self, ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, V) logits for every position."""
        return next(transformer.logits(self.ops, self.spec, self.weights, ids))[1]

    def release(self) -> None:
        """Nothing to give back: every activation was a fresh tensor, freed when the step ended."""


def _stackable(steps: Sequence[StepInput]) -> bool:
    """Whether the steps' canvases can run as one batch: the same shape, no block caches."""
    return all(s.cache is None and s.ids.shape == steps[0].ids.shape for s in steps)
