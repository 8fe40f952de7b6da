"""The Mosaic executor runs inside its plan: same logits as eager, nothing large outside the arena."""

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.kernels.planned import PlannedOps
from mosaic_dllm.memory.accounting import LiveTensorTracker
from mosaic_dllm.plan.shapes import RequestShape
from mosaic_dllm.runtime import EagerExecutor
from mosaic_dllm.runtime.mosaic import ArenaMemory, PlanMismatchError
from tests.helpers import joined


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_only_declared_kernel_workspace_allocates_outside_the_arena(tiny_checkpoints, family):
    llm = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, executor="mosaic", row_chunk=8)
    ids = torch.randint(0, 300, (2, 70), generator=torch.Generator().manual_seed(1))
    rows = torch.arange(30, 70)
    with LiveTensorTracker() as tracker:
        for _ in llm.executor.row_logits(ids, rows):
            pass
    plan = llm.executor.last_plan
    outside = {}
    for r in tracker.timeline.records:
        outside[r.op] = max(outside.get(r.op, 0), r.new_bytes)
    big = {op: n for op, n in outside.items() if n > 256}  # the rotary inverse frequencies are 32 bytes
    # the attention output; GEMMs on fewer rows than a tile run on a zero-padded tile (kernels/tiles.py);
    # the packed tokens' positions for rotary
    assert (
        {"scaled_dot_product_attention"}
        <= set(big)
        <= {"scaled_dot_product_attention", "zeros", "empty", "arange", "cat"}
    )
    assert max(r.live_bytes for r in tracker.timeline.records) <= plan.workspace_bytes


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_planned_logits_equal_eager_logits_bit_for_bit(tiny_checkpoints, family, dtype):
    """Every op writes with out= or in place, with the official arithmetic: no tolerance needed,
    except where the device profile says so. The official MoE layer calls each expert on however
    many tokens chose it; batch invariance calls it on sizes the device keeps exact, so where small
    calls round differently (fp32 on CPUs whose BLAS rounds by row count) the experts' outputs are
    within rounding of eager's: a stated tolerance, the same as recompute's."""
    llm = LLM(tiny_checkpoints[family], dtype=dtype, executor="mosaic", row_chunk=64)
    ids = torch.randint(0, 300, (1, 41), generator=torch.Generator().manual_seed(2))
    full = EagerExecutor(llm.spec, llm.checkpoint.weights).logits(ids)
    rows = torch.arange(41)
    got = joined(llm.executor.row_logits(ids, rows))
    moe, rules = llm.spec.moe, llm.executor.plans.rules
    if moe is None or rules.swiglu(llm.spec.hidden_size, moe.expert_intermediate_size).every_count:
        assert torch.equal(got, full)
    else:
        torch.testing.assert_close(got, full, rtol=1e-5, atol=5e-5 * full.abs().max().item())


def test_a_generation_plans_a_handful_of_times_and_gives_memory_back(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llada"], executor="mosaic", row_chunk=16)
    out = llm.generate("Return the", GenerationConfig(gen_length=32, steps=16, block_length=8))[0]
    assert out.forward_passes == 16
    assert llm.executor.plans.plans_made <= 4  # rows 8..1 per block bucket to 8, 4, 2, 1
    assert llm.executor.arena.touched_bytes == 0  # released when the request ended


def test_a_step_that_disagrees_with_its_plan_is_stopped(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llada"], executor="mosaic")
    plan = llm.executor.plan_for(RequestShape(1, 20, 4))
    ops = PlannedOps(ArenaMemory(plan, llm.executor.arena, llm.executor.plans.rules))
    with pytest.raises(PlanMismatchError, match="asks for"):
        ops.embed(torch.zeros(1, 21, dtype=torch.long), llm.checkpoint.weights.embed, name="embed")


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_what_allocates_outside_the_arena_stays_within_the_declared_workspace(tiny_checkpoints, family):
    """The plan's workspace (attention output, MoE routing and experts, the sampler) bounds the rest."""
    llm = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, executor="mosaic", row_chunk=8)
    cfg = GenerationConfig(gen_length=40, steps=1, temperature=0.5)
    if family == "dream":
        cfg = GenerationConfig(gen_length=40, steps=1, temperature=0.5, alg="entropy", top_p=0.9)
    plan = llm.check_memory(3, cfg)
    with LiveTensorTracker() as tracker:
        llm.generate([5, 6, 7], cfg)
    step = max(r.live_bytes for r in tracker.timeline.records)
    assert plan.workspace_bytes >= step * 0.5  # the declared bound is the right size...
    assert step <= plan.workspace_bytes + 64 * 1024  # ...and holds, up to the step's O(L) bookkeeping


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_the_sampler_holds_one_chunk_of_temporaries_at_a_time(temperature):
    """With a wide vocabulary the sampler's temporaries dominate the workspace; across several
    logits chunks only one chunk's may be alive, as the plan assumes."""
    from dataclasses import replace

    from mosaic_dllm.bench.step import StepRequest, measure, random_weights
    from tests.tiny import tiny_spec

    spec = replace(tiny_spec("llada", ids={"mask": 317, "eos": 316}), vocab_size=20000)
    request = StepRequest.first_step(spec, 256, 0.5, GenerationConfig(temperature=temperature))
    m = measure(spec, random_weights(spec, torch.bfloat16), "mosaic", request, {"row_chunk": 16})
    outside = m.timeline.peak - m.timeline.planned_bytes
    assert m.plan["workspace_bytes"] >= 16 * 20000 * 2  # at least one chunk's softmax
    assert outside <= m.plan["workspace_bytes"] + 16 * 1024  # + the step's O(L) bookkeeping
