"""Recomputing K and V below the exact floor (opt-in): the memory it saves, the search's choice,
and its tolerance.

The recomputing region merges per-key-chunk softmaxes by their log-sum-exps, so its logits are not
the exact kernel's bits. The stated tolerance: in fp32 the logits equal eager's within rtol 1e-5
and 5e-5 x the largest |logit|; in bf16 they are as close to the fp32 logits as eager's bf16 logits
are (mean absolute error within 5% of eager's). fp32 generation at temperature 0 gives eager's
tokens on the tiny grid.
"""

from dataclasses import replace

import pytest
import torch

from mosaic_dllm import LLM, DoesNotFit, GenerationConfig
from mosaic_dllm.bench.presets import preset
from mosaic_dllm.models.groups import CHUNKABLE_GROUPS, Chunks
from mosaic_dllm.plan.compute import recompute_cost
from mosaic_dllm.plan.search import fit, max_length, most_chunked
from mosaic_dllm.plan.shapes import StepShape
from mosaic_dllm.plan.step_plan import PlanCache
from mosaic_dllm.runtime import EagerExecutor
from tests.helpers import joined
from tests.profiles import intel_amx

pytestmark = pytest.mark.filterwarnings("ignore:the prompt .* more than the checkpoint's context")
ALLOWED = CHUNKABLE_GROUPS  # the exact groups and recompute
LENGTH = 1000  # four query blocks of 250 at 4 pieces (the smallest block is 256: here 3 of 333)


def _logits(llm, ids):
    rows = torch.arange(ids.shape[1])
    return joined(llm.executor.row_logits(ids, rows)).float()


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_recomputed_logits_are_within_the_stated_tolerance(tiny_checkpoints, family):
    ids = torch.randint(0, 300, (2, LENGTH), generator=torch.Generator().manual_seed(5))
    recompute = Chunks(recompute=3)
    fp32 = LLM(tiny_checkpoints[family], dtype=torch.float32, executor="mosaic", row_chunk=64, chunks=recompute)
    truth = EagerExecutor(fp32.spec, fp32.checkpoint.weights).logits(ids).float()
    got = _logits(fp32, ids)
    assert not torch.equal(got, truth)  # the merge really ran (it is not the exact kernel)
    torch.testing.assert_close(got, truth, rtol=1e-5, atol=5e-5 * truth.abs().max().item())

    bf16 = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, executor="mosaic", row_chunk=64, chunks=recompute)
    eager = EagerExecutor(bf16.spec, bf16.checkpoint.weights).logits(ids).float()
    got = _logits(bf16, ids)
    assert (got - truth).abs().mean() <= 1.05 * (eager - truth).abs().mean()


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_recompute_generates_the_eager_tokens_at_temperature_0(tiny_checkpoints, family):
    """fp32. In bf16 a token can differ where eager's own rounding decides a near tie (the default
    model at 600 tokens: one generation of four differed, in 2 of 32 tokens): the tolerance above."""
    dtype = torch.float32
    prompt = list(range(5, 300)) * 2  # 590 prompt tokens: two query blocks of 307
    if family == "dream":
        cfg = GenerationConfig(gen_length=24, steps=12, temperature=0.0, alg="entropy")
    else:
        cfg = GenerationConfig(gen_length=24, steps=12, block_length=8, temperature=0.0)
    long = {"allow_long_context": True}
    eager = LLM(tiny_checkpoints[family], dtype=dtype, executor="eager", **long)
    recompute = LLM(tiny_checkpoints[family], dtype=dtype, row_chunk=8, chunks=Chunks(recompute=2), **long)
    expected = eager.generate([prompt], cfg)[0].token_ids
    assert recompute.generate([prompt], cfg)[0].token_ids == expected
    assert all(shape.chunks.recompute == 2 for shape in recompute.executor.plans._plans)


@pytest.mark.parametrize("profile", ["this device", "intel-amx"])
def test_the_search_recomputes_only_when_no_exact_plan_fits(profile):
    """On every device recompute's floor (the residual stream and the held outputs, 2 hidden
    widths a token) is below the exact one for full-head attention (the residual stream, K and V:
    3 widths; 5 where the kernel copies K and V inside each call, as bf16 on AMX CPUs)."""
    device = intel_amx() if profile == "intel-amx" else None
    plans = PlanCache(preset("llada-8b", layers=2), torch.bfloat16, profile=device)
    shape = StepShape.of(1, 8192, 64)
    exact_floor = plans.get(most_chunked(shape, rules=plans.rules)).predicted_peak_bytes
    recompute_floor = plans.get(most_chunked(shape, ALLOWED, rules=plans.rules)).predicted_peak_bytes
    widths = 5 if plans.rules.attention.copies_kv else 3
    saved = (widths - 2) * 8192 * plans.spec.hidden_size * 2  # bf16 widths a token
    assert 0.6 * saved < exact_floor - recompute_floor < 1.1 * saved  # less the region buffers
    roomy = fit(plans, shape, exact_floor, ALLOWED).plan
    assert roomy.graph.shape.chunks.recompute == 1  # an exact plan fits: no recompute
    tight = fit(plans, shape, (exact_floor + recompute_floor) // 2, ALLOWED).plan
    assert tight.graph.shape.chunks.recompute > 1
    assert tight.predicted_peak_bytes <= (exact_floor + recompute_floor) // 2
    assert tight.peak_group in ("recompute", "norms", "ffn", "logits")
    with pytest.raises(DoesNotFit, match="allow_recompute=True"):  # not allowed: told it would fit
        fit(plans, shape, (exact_floor + recompute_floor) // 2)
    with pytest.raises(DoesNotFit) as below:
        fit(plans, shape, recompute_floor - 1, ALLOWED)
    assert "allow_recompute" not in str(below.value)
    rows = lambda n: 64  # noqa: E731
    gain = max_length(plans, shape, exact_floor, rows, ALLOWED) / max_length(plans, shape, exact_floor, rows)
    assert gain > 1.2 if widths == 3 else gain > 1.5


def test_grouped_query_models_gain_nothing_and_keep_exact_plans():
    """Dream's K and V (4 of 28 heads) are narrower than the held outputs: never cheaper."""
    plans = PlanCache(preset("dream-7b", layers=2), torch.bfloat16)
    shape = StepShape.of(1, 8192, 64)
    exact_floor = plans.get(most_chunked(shape, rules=plans.rules)).predicted_peak_bytes
    assert plans.get(most_chunked(shape, ALLOWED, rules=plans.rules)).predicted_peak_bytes > exact_floor
    assert fit(plans, shape, exact_floor, ALLOWED).plan.graph.shape.chunks.recompute == 1
    with pytest.raises(DoesNotFit) as refused:
        fit(plans, shape, int(exact_floor * 0.95), ALLOWED)
    assert "allow_recompute" not in str(refused.value)
    rows = lambda n: 64  # noqa: E731
    assert max_length(plans, shape, exact_floor, rows, ALLOWED) == max_length(plans, shape, exact_floor, rows)


def test_a_step_with_block_caches_never_recomputes():
    plans = PlanCache(preset("llada-8b", layers=2), torch.bfloat16)
    shape = replace(StepShape.of(1, 8192, 64), cache_bytes=1 << 20)
    assert most_chunked(shape, ALLOWED, rules=plans.rules).chunks.recompute == 1
    exact_floor = plans.get(most_chunked(shape, rules=plans.rules)).predicted_peak_bytes
    with pytest.raises(DoesNotFit) as refused:
        fit(plans, shape, int(exact_floor * 0.95), ALLOWED)
    assert "allow_recompute" not in str(refused.value)


def test_the_extra_compute_is_stated():
    spec = preset("llada-8b", layers=2)
    shape = StepShape.of(1, 4096, 64)
    assert recompute_cost(spec, shape).passes == 1 and recompute_cost(spec, shape).extra_fraction == 0
    cost = recompute_cost(spec, StepShape.of(1, 4096, 64, chunks=Chunks(recompute=4)))
    assert cost.passes == 4
    # three more K and V projections per layer (4096 x 4096 x 8192 multiply-adds each) over the step
    h = spec.hidden_size
    per_layer = 4096 * (4 * h * h + 3 * h * spec.intermediate_size) + 2 * 4096 * 4096 * h
    assert cost.extra_fraction == pytest.approx(3 * 4096 * 2 * h * h / per_layer)


def test_the_engine_recomputes_when_allowed_and_the_budget_needs_it(tiny_checkpoints):
    prompt = (list(range(5, 300)) * 7)[:1984]  # a 2000-token canvas: the tiny model's region pays off
    cfg = GenerationConfig(gen_length=16, steps=8, block_length=8)
    path, long = tiny_checkpoints["llada"], {"allow_long_context": True}
    plans = LLM(path, dtype=torch.float32).executor.plans
    shape = StepShape.of(1, 2000, 8)
    exact_floor = plans.get(most_chunked(shape, rules=plans.rules)).predicted_peak_bytes
    recompute_floor = plans.get(most_chunked(shape, ALLOWED, rules=plans.rules)).predicted_peak_bytes
    assert recompute_floor < exact_floor
    budget = (exact_floor + recompute_floor) // 2
    with pytest.raises(DoesNotFit, match="allow_recompute=True"):
        LLM(path, dtype=torch.float32, memory_budget=budget, row_chunk=8, **long).generate([prompt], cfg)
    llm = LLM(path, dtype=torch.float32, memory_budget=budget, row_chunk=8, allow_recompute=True, **long)
    out = llm.generate([prompt], cfg)[0]
    eager = LLM(path, dtype=torch.float32, executor="eager", **long)
    assert out.token_ids == eager.generate([prompt], cfg)[0].token_ids
    plans = [r.plan for r in llm.executor.searches.values()]
    assert any(p.graph.shape.chunks.recompute > 1 for p in plans)
    assert all(p.predicted_peak_bytes <= budget for p in plans)
    with pytest.raises(ValueError, match="needs the mosaic executor"):
        LLM(path, executor="eager", allow_recompute=True)


def test_the_float32_chunk_path_matches_the_fused_kernel():
    """Devices without the fused CPU kernel merge chunks computed in float32 maths: the same output
    and log-sum-exp (checked here on CPU by forcing that path)."""
    from mosaic_dllm.kernels.attention import chunk_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, 300, 32, generator=g)
    k, v = (torch.randn(1, 2, 200, 32, generator=g) for _ in range(2))
    fused, fallback = chunk_attention(q, k, v), chunk_attention(q, k, v, fused=False)
    torch.testing.assert_close(fallback[0], fused[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fallback[1], fused[1], rtol=1e-5, atol=1e-5)
