"""The longest sequence a budget holds, per executor, predicted from shapes alone (no weights).

Mosaic: the longest length whose own first step the lazy search fits, then the chunks it picks at
that length. Eager: the live-tensor timeline of the first step under FakeTensorMode
(`bench.step.predict`), bisected over the length. The eager executor frees each layer's
activations before the next, so its peak does not depend on the number of layers and one layer
is traced. MoE routing depends on values, so the eager MoE step cannot be predicted.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..config import GenerationConfig
from ..decoding import sampler_for
from ..device import DeviceProfile
from ..models.groups import EXACT_GROUPS
from ..models.spec import ArchSpec
from ..plan.search import LENGTH_LIMIT, DoesNotFit, fit
from ..plan.search import longest as search_longest
from ..plan.shapes import StepShape, chunk_bucket
from ..plan.step_plan import PlanCache
from .step import StepRequest, first_step_config, predict


def first_step_shape(
    spec: ArchSpec,
    dtype: torch.dtype,
    length: int,
    alpha: float,
    row_chunk: int,
    cfg_scale: float = 0.0,
    rows: int | None = None,
    sampler_row_bytes: int | None = None,
) -> StepShape:
    """The shape of a request's first (largest) step at total length `length`, prompt fraction
    `alpha`: the rows the sampler reads (or `rows`), its batch and its measured bytes per logits row
    (at temperature 0; measured unless given); for block diffusion the prefill with the first block
    and its K/V cache."""
    sampler = sampler_for(spec)
    prompt, cfg = first_step_config(spec, length, alpha, GenerationConfig(cfg_scale=cfg_scale or None))
    if sampler_row_bytes is None:
        sampler_row_bytes = sampler.row_bytes(cfg, spec.vocab_size, dtype, torch.device("cpu"))
    chunk = chunk_bucket(rows or sampler.most_rows(cfg), row_chunk)
    first, _ = sampler.largest_steps(cfg, prompt)
    batch = sampler.guidance_batch(cfg)
    return replace(
        StepShape.of(batch, first.tokens, chunk, sampler_row_bytes=sampler_row_bytes),
        cache_keys=first.keys,
        cache_bytes=sampler.cache_bytes(cfg, prompt, dtype),
        masked_keys=first.masked_keys,
    )


EAGER_LENGTH_LIMIT = 1 << 20  # predicting eager past this takes minutes; reaching it means "at least"


def mosaic_capacity(
    spec: ArchSpec,
    dtype: torch.dtype,
    budget: int,
    alpha: float,
    row_chunk: int,
    groups: tuple[str, ...] = EXACT_GROUPS,
    profile: DeviceProfile | None = None,
    ranks: int = 1,
    rows: int | None = None,
    tensor_ranks: int = 1,
) -> dict:
    """`groups`: what the search may split (with "recompute": below the exact floor); `profile`:
    the device planned for (default this machine's CPU); `ranks`: sequence-parallel ranks (the
    budget is each rank's; `tensor_ranks`: tensor-parallel ones); `rows`: the logits rows the
    sampler reads (default every masked one)."""
    plans = PlanCache(spec, dtype, profile=profile)
    sampler = first_step_shape(spec, dtype, 2, alpha, row_chunk).sampler_row_bytes  # measured once

    def at(n: int) -> StepShape:
        step = first_step_shape(spec, dtype, n, alpha, row_chunk, rows=rows, sampler_row_bytes=sampler)
        return replace(step, ranks=ranks, tensor_ranks=tensor_ranks)

    def fits(n: int) -> bool:  # each length's own first step (block diffusion: prefill and cache grow apart)
        try:
            fit(plans, at(n), budget, groups, explain=False)
        except DoesNotFit:
            return False
        return True

    longest = search_longest(fits, limit=LENGTH_LIMIT).max_len
    out = {"max_len": longest, "sampler_row_bytes": sampler, "at_search_limit": longest == LENGTH_LIMIT}
    if longest:
        result = fit(plans, at(longest), budget, groups)
        out |= {
            "chunks": result.plan.summary()["chunks"],
            "predicted_peak_activation_bytes": result.plan.predicted_peak_bytes,
            "search_seconds": round(result.seconds, 4),
            "plans_tried": result.plans_tried,
        }
    return out


def eager_capacity(
    spec: ArchSpec, dtype: torch.dtype, budget: int, alpha: float, limit: int = EAGER_LENGTH_LIMIT
) -> dict:
    if spec.moe is not None:
        return {"max_len": None, "note": "MoE routing depends on values: the eager step cannot be predicted"}
    # Quantized kernels return fresh outputs as F.linear does: eager's activations are the unquantized ones'
    one_layer = replace(spec, num_layers=1, quantization=None)
    cfg = GenerationConfig()

    sampler = sampler_for(spec)

    def fits(length: int) -> bool:
        request = StepRequest.first_step(one_layer, length, alpha, cfg)
        # block diffusion: one layer's cache is in the step's peak; the other layers' stay alive too
        caches = sampler.cache_bytes(request.config, request.prompt_length, dtype) * (spec.num_layers - 1)
        return predict(one_layer, dtype, "eager", request).peak + caches // spec.num_layers <= budget

    found = search_longest(fits, limit=limit, precision=16).max_len
    return {"max_len": found, "at_search_limit": found == limit}
