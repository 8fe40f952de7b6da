"""The longest sequence a budget holds, per executor, predicted from shapes alone (no weights).

Mosaic: the lazy search's floor (`planner.search.max_length`), then the chunks the search picks at
that length. Eager: the live-tensor timeline of the first step under FakeTensorMode
(`bench.step.predict`), bisected over the length. The eager executor frees each layer's
activations before the next, so its peak does not depend on the number of layers and one layer
is traced. MoE routing depends on values, so the eager MoE step cannot be predicted.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from ..config import BLOCK_FAMILIES, GenerationConfig
from ..decoding.sampler_cost import sampler_row_bytes
from ..graph.trace import StepShape, chunk_bucket
from ..models.spec import ArchSpec
from ..models.weights import expected_shapes
from ..planner.search import fit, longest, max_length
from ..planner.step_plan import PlanCache
from .step import StepRequest, predict


def weight_bytes(spec: ArchSpec, dtype: torch.dtype) -> int:
    return sum(math.prod(s) for s in expected_shapes(spec).values()) * dtype.itemsize


def first_step_rows(spec: ArchSpec, length: int, alpha: float) -> int:
    """Rows the first step samples: every generated position (one block spanning the answer)."""
    return max(1, length - max(1, int(length * alpha)))


def mosaic_capacity(spec: ArchSpec, dtype: torch.dtype, budget: int, alpha: float, row_chunk: int) -> dict:
    cfg = GenerationConfig(alg="maskgit_plus" if spec.family not in BLOCK_FAMILIES else "origin")
    plans = PlanCache(spec, dtype, 64)
    sampler = sampler_row_bytes(spec.family, cfg.resolved(spec.family), spec.vocab_size, dtype)
    shape = StepShape(1, 2, 1, sampler_row_bytes=sampler)
    rows_at = lambda n: chunk_bucket(first_step_rows(spec, n, alpha), row_chunk)  # noqa: E731
    longest = max_length(plans, replace(shape, chunk=row_chunk), budget, rows_at)
    out = {"max_len": longest, "sampler_row_bytes": sampler}
    if longest:
        result = fit(plans, replace(shape, length=longest, chunk=rows_at(longest)), budget)
        out |= {
            "chunks": result.plan.summary()["chunks"],
            "predicted_peak_activation_bytes": result.plan.predicted_peak_bytes,
            "search_seconds": round(result.seconds, 4),
            "plans_tried": result.plans_tried,
        }
    return out


def eager_capacity(spec: ArchSpec, dtype: torch.dtype, budget: int, alpha: float, limit: int = 1 << 20) -> dict:
    if spec.moe is not None:
        return {"max_len": None, "note": "MoE routing depends on values: the eager step cannot be predicted"}
    one_layer = replace(spec, num_layers=1)
    cfg = GenerationConfig(alg="maskgit_plus" if spec.family not in BLOCK_FAMILIES else "origin")

    def fits(length: int) -> bool:
        request = StepRequest.first_step(one_layer, length, alpha, cfg)
        return predict(one_layer, dtype, "eager", request).peak <= budget

    return {"max_len": longest(fits, limit, precision=16)}
