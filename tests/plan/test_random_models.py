"""Property test: for random architectures, shapes and chunkings, the traced plan is valid and the
executor that runs inside it gives the eager logits bit for bit (bf16)."""

from dataclasses import replace

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mosaic_dllm.bench.step import random_weights
from mosaic_dllm.models.groups import Chunks
from mosaic_dllm.plan.shapes import StepShape
from mosaic_dllm.plan.step_plan import plan_step
from mosaic_dllm.runtime import EagerExecutor, ExecutorOptions, MosaicExecutor
from tests.helpers import joined
from tests.tiny import tiny_spec


@st.composite
def models(draw):
    family = draw(st.sampled_from(["llada", "dream", "llada_moe"]))
    spec = tiny_spec(family, ids={"mask": 317, "eos": 316})
    kv_heads = draw(st.sampled_from([1, 2, 4]))
    head_dim = draw(st.sampled_from([8, 16]))
    spec = replace(
        spec,
        num_layers=draw(st.integers(1, 3)) if family != "llada_moe" else 2,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rotary_dim=draw(st.sampled_from([r for r in (4, 8, head_dim) if r <= head_dim])),
        intermediate_size=draw(st.sampled_from([48, 96])),
    )
    chunks = Chunks(*(draw(st.integers(1, 5)) for _ in range(4)))
    return spec, draw(st.integers(1, 2)), draw(st.integers(2, 70)), draw(st.integers(1, 9)), chunks


@settings(max_examples=25, deadline=None)
@given(models())
def test_random_models_plan_validly_and_run_exactly(case):
    spec, batch, length, row_chunk, chunks = case
    plan = plan_step(spec, torch.bfloat16, StepShape.of(batch, length, min(row_chunk, length), chunks), check=True)
    assert plan.lower_bound_bytes <= plan.arena_bytes
    weights = random_weights(spec, torch.bfloat16)
    ids = torch.randint(0, 316, (batch, length), generator=torch.Generator().manual_seed(length))
    full = EagerExecutor(spec, weights).logits(ids)
    executor = MosaicExecutor(spec, weights, ExecutorOptions(row_chunk=row_chunk, chunks=chunks))
    rows = torch.arange(length)
    got = joined(executor.row_logits(ids, rows))
    assert torch.equal(got, full)
