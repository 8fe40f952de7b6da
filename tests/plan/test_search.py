"""The lazy chunking search: fits when it can, splits only the peak group, fails early and helpfully."""

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.bench.presets import preset
from mosaic_dllm.models.groups import Chunks, group_spans
from mosaic_dllm.plan.search import MIN_CHUNK_TOKENS, DoesNotFit, fit, max_length, most_chunked
from mosaic_dllm.plan.shapes import StepShape
from mosaic_dllm.plan.step_plan import PlanCache
from tests.profiles import intel_amx

SPEC = preset("llada-8b", layers=2)


def cache():
    return PlanCache(SPEC, torch.bfloat16)


def test_an_ample_budget_keeps_the_unchunked_plan():
    shape = StepShape.of(1, 2048, 64)
    result = fit(cache(), shape, budget=1 << 40)
    assert result.plan.graph.shape == shape and result.plans_tried == 1


@pytest.mark.parametrize("fraction", [0.9, 0.7, 0.5, 0.35])
def test_a_tighter_budget_is_met_by_splitting_the_peak_groups(fraction):
    plans = cache()
    shape = StepShape.of(1, 2048, 64)
    unchunked = plans.get(shape).predicted_peak_bytes
    floor = plans.get(most_chunked(shape, rules=plans.rules)).predicted_peak_bytes
    budget = int(floor + fraction * (unchunked - floor))
    result = fit(plans, shape, budget)
    plan = result.plan
    assert plan.predicted_peak_bytes <= budget < unchunked
    chunks = plan.graph.shape.chunks
    assert chunks != shape.chunks and result.plans_tried >= 2
    # Lazy: undoing the last split of any group would no longer fit or would not be on the search path.
    assert plan.predicted_peak_bytes >= floor


def test_below_the_floor_fails_with_the_floor_and_the_longest_length_that_fits():
    plans = cache()
    shape = StepShape.of(1, 4096, 64)
    floor = plans.get(most_chunked(shape, rules=plans.rules)).predicted_peak_bytes
    with pytest.raises(DoesNotFit, match="cannot be chunked further") as err:
        fit(plans, shape, budget=floor - 1)
    longest = err.value.max_length
    assert 0 < longest < 4096 and "longest sequence" in str(err.value) and str(longest) in str(err.value)
    assert plans.get(most_chunked(StepShape.of(1, longest, 64), rules=plans.rules)).predicted_peak_bytes <= floor - 1
    assert plans.get(most_chunked(StepShape.of(1, longest + 1, 64), rules=plans.rules)).predicted_peak_bytes > floor - 1


def test_max_length_grows_with_the_budget():
    plans = cache()
    lengths = [max_length(plans, StepShape.of(1, 2, 64), b << 20, rows_at=lambda n: n) for b in (64, 256, 1024)]
    assert 0 < lengths[0] < lengths[1] < lengths[2]


@pytest.mark.parametrize("profile", ["this device", "intel-amx"])
def test_chunks_never_go_below_the_minimum_size(profile):
    rules = (cache() if profile == "this device" else PlanCache(SPEC, torch.bfloat16, profile=intel_amx())).rules
    shape = most_chunked(StepShape.of(1, 1000, 64), rules=rules)
    assert shape.chunk == 1
    assert -(-1000 // shape.chunks.ffn) <= MIN_CHUNK_TOKENS and -(-1000 // shape.chunks.rotary) <= MIN_CHUNK_TOKENS
    group = rules.group("attention")  # attention: only the query blocks the device keeps exact
    assert group.min_block == rules.attention.min_block and group.align == rules.attention.align
    for length in (1000, 4096, 5000):
        pieces = most_chunked(StepShape.of(1, length, 64), rules=rules).chunks.attention
        blocks = group_spans(length, pieces, group)
        assert all(e - s >= group.min_block and s % group.align == 0 for s, e in blocks)
        assert length < 2 * group.min_block or min(e - s for s, e in blocks) < 2 * group.min_block


def test_engine_refuses_a_request_too_big_for_its_budget_before_any_work(tiny_checkpoints):
    # above the fixed GEMM tile (kernels/tiles.py); long contexts allowed: the context is checked before memory
    llm = LLM(tiny_checkpoints["llada"], memory_budget="192KiB", allow_long_context=True)
    called = []
    with pytest.raises(DoesNotFit, match="longest sequence") as err:
        llm.generate("Return the", GenerationConfig(gen_length=512, steps=8), callback=called.append)
    assert not called and err.value.max_length < 512 + 3
    fits = err.value.max_length - 3  # the prompt is 2-3 tokens; a request within the answer runs
    assert fits > 0


def test_engine_runs_within_a_tight_budget_with_the_eager_tokens(tiny_checkpoints):
    cfg = GenerationConfig(gen_length=64, steps=16, block_length=16)
    eager = LLM(tiny_checkpoints["llada"], dtype="bf16", executor="eager").generate("Return the", cfg)[0]
    roomy = LLM(tiny_checkpoints["llada"], dtype="bf16")
    unchunked = roomy.check_memory(3, cfg).predicted_peak_bytes
    tight = LLM(tiny_checkpoints["llada"], dtype="bf16", memory_budget=int(unchunked * 0.8), row_chunk=16)
    out = tight.generate("Return the", cfg)[0]
    assert out.token_ids == eager.token_ids
    chosen = [r.plan.graph.shape for r in tight.executor.searches.values()]
    assert any(s.chunks != Chunks() or s.chunk < 16 for s in chosen)


def test_a_budget_with_the_eager_executor_is_refused(tiny_checkpoints):
    with pytest.raises(ValueError, match="needs the mosaic executor"):
        LLM(tiny_checkpoints["llada"], executor="eager", memory_budget="1GiB")


@pytest.mark.parametrize("name", ["llada-8b", "dream-7b", "llada-moe-7b"])
def test_the_floor_is_the_residual_stream_k_and_v(name):
    """Chunking every group leaves only what exact attention needs whole: the residual stream, K and
    V (the attention block runs as one region in query blocks: no full-length q, attention output
    or rotary table), plus one query block's q and a few hundred rows of scratch."""
    spec, length = preset(name, layers=2), 65536
    plans = PlanCache(spec, torch.bfloat16)
    floor = plans.get(most_chunked(StepShape.of(1, length, 64), rules=plans.rules))
    whole = length * (spec.hidden_size + 2 * spec.num_kv_heads * spec.head_dim) * 2
    assert whole <= floor.lower_bound_bytes <= whole * 1.15
    assert floor.arena_bytes <= floor.lower_bound_bytes * 1.01
    full = [floor.graph.ops[b.op] for b in floor.graph.buffers if b.shape[:2] == (1, length)]
    assert full.count("attention_region") == 2  # K and V: no q, no attention output at full length


def test_a_split_that_cannot_shrink_the_chunks_is_refused():
    """On a device whose attention blocks need >= 768 queries from multiples of 256, 1311 queries
    make one exact block whatever the pieces (a split leaves a tail under 768): the search must
    move on, not ask again forever."""
    from mosaic_dllm.plan.search import _split

    rules = intel_amx().rules(torch.bfloat16)
    assert _split(StepShape.of(1, 1311, 64), "attention", rules) is None
    assert _split(StepShape.of(1, 1600, 64), "attention", rules).chunks.attention == 2
    assert _split(StepShape.of(1, 1600, 64), "norms", rules).chunks.norms == 2


def test_the_longest_length_reported_is_the_longest_the_search_admits(tiny_checkpoints):
    """A DoesNotFit's and `--max-len`'s longest length is what the search fits, not the most-chunked
    plan's (chunking attention into query blocks can raise a step's peak): L fits, L + 1 does not."""
    plans = LLM(tiny_checkpoints["llada"], dtype="bf16").executor.plans
    shape = StepShape.of(1, 64, 8)
    for budget in (200 << 10, 600 << 10, 7_500_000):
        longest = max_length(plans, shape, budget, rows_at=lambda n: 8)
        fit(plans, shape.alone(longest), budget, explain=False)
        with pytest.raises(DoesNotFit):
            fit(plans, shape.alone(longest + 1), budget, explain=False)
