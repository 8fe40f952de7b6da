"""Chunked norms, rotary by positions, attention by query blocks, FFN/MoE and the norm+projection and
projection+residual regions by token chunks: same tokens, same logits."""

import pytest
import torch

from mosaic_dllm import LLM, DoesNotFit, GenerationConfig
from mosaic_dllm.bench.presets import preset
from mosaic_dllm.models.groups import Chunks, spans
from mosaic_dllm.plan.search import fit, most_chunked
from mosaic_dllm.plan.shapes import RequestShape, StepShape
from mosaic_dllm.plan.step_plan import PlanCache
from mosaic_dllm.runtime import EagerExecutor
from tests.helpers import joined

FORCED = [
    Chunks(norms=3),
    Chunks(rotary=4),
    Chunks(ffn=5),
    Chunks(projections=3),
    Chunks(norms=2, rotary=3, attention=3, ffn=7, projections=4),
]


def test_spans_cover_the_range_in_order():
    assert spans(10, 3) == [(0, 4), (4, 8), (8, 10)]
    assert spans(2, 5) == [(0, 1), (1, 2)]
    assert spans(7, 1) == [(0, 7)]


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
@pytest.mark.parametrize("chunks", FORCED, ids=str)
def test_chunked_logits_equal_eager_bf16_bit_for_bit(tiny_checkpoints, family, chunks):
    llm = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, executor="mosaic", row_chunk=4, chunks=chunks)
    ids = torch.randint(0, 300, (2, 37), generator=torch.Generator().manual_seed(3))
    full = EagerExecutor(llm.spec, llm.checkpoint.weights).logits(ids)
    rows = torch.arange(37)
    got = joined(llm.executor.row_logits(ids, rows))
    assert torch.equal(got, full)


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_in_query_blocks_equals_eager_bit_for_bit(tiny_checkpoints, family, dtype):
    """A canvas long enough for attention to run in query blocks (1600 = 768 + 832 queries)."""
    chunks = Chunks(attention=2, rotary=5)
    llm = LLM(tiny_checkpoints[family], dtype=dtype, executor="mosaic", row_chunk=64, chunks=chunks)
    ids = torch.randint(0, 300, (1, 1600), generator=torch.Generator().manual_seed(5))
    full = EagerExecutor(llm.spec, llm.checkpoint.weights).logits(ids)
    rows = torch.arange(0, 1600, 7)
    got = joined(llm.executor.row_logits(ids, rows))
    assert torch.equal(got, full[:, rows])


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_chunked_logits_fp32_within_tolerance(tiny_checkpoints, family):
    """fp32 GEMMs over fewer rows may take another BLAS blocking: a few ulps per GEMM, carried through
    the layers (attention's softmax amplifies them) to about 1e-5 of the largest logit; near-zero
    logits make that large in relative terms. Hence rtol 1e-5 with atol 2e-5 x max |logit|."""
    llm = LLM(tiny_checkpoints[family], dtype=torch.float32, executor="mosaic", row_chunk=4, chunks=FORCED[-1])
    ids = torch.randint(0, 300, (1, 37), generator=torch.Generator().manual_seed(4))
    full = EagerExecutor(llm.spec, llm.checkpoint.weights).logits(ids)
    got = joined(llm.executor.row_logits(ids, torch.arange(37)))
    torch.testing.assert_close(got, full, rtol=1e-5, atol=2e-5 * full.abs().max().item())


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
@pytest.mark.parametrize("chunks", FORCED[1:], ids=str)
def test_generation_with_forced_chunks_gives_the_eager_tokens(tiny_checkpoints, family, chunks):
    cfg = GenerationConfig(gen_length=24, steps=12, block_length=8 if family != "dream" else None, temperature=0.7)
    if family == "dream":
        cfg = GenerationConfig(gen_length=24, steps=12, temperature=0.7, alg="entropy", top_p=0.9)
    eager = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, executor="eager")
    mosaic = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, executor="mosaic", row_chunk=3, chunks=chunks)
    assert mosaic.generate("Return the", cfg)[0].token_ids == eager.generate("Return the", cfg)[0].token_ids


def test_the_allocator_variant_runs_the_same_ops_unplanned(tiny_checkpoints):
    cfg = GenerationConfig(gen_length=16, steps=8, block_length=8)
    arena = LLM(tiny_checkpoints["llada"], dtype=torch.bfloat16).generate("Return the", cfg)[0]
    plain = LLM(tiny_checkpoints["llada"], dtype=torch.bfloat16, activations="allocator").generate("Return the", cfg)[0]
    assert plain.token_ids == arena.token_ids


def test_the_search_splits_only_the_allowed_groups():
    """At llada-8b dims the FFN holds the peak: allowed to split only it and the logits rows, the
    search fits a budget between their floor and the unchunked peak without touching the rest."""
    groups = ("ffn", "logits")
    plans = PlanCache(preset("llada-8b", layers=2), torch.bfloat16)
    shape = StepShape.of(1, 2048, 64)
    unchunked = plans.get(shape).predicted_peak_bytes
    floor = plans.get(most_chunked(shape, groups, rules=plans.rules)).predicted_peak_bytes
    assert floor < unchunked
    chosen = fit(plans, shape, (floor + unchunked) // 2, groups).plan.graph.shape
    assert chosen.chunks.norms == chosen.chunks.attention == chosen.chunks.projections == 1
    assert chosen.chunks.ffn > 1 or chosen.chunk < 64
    with pytest.raises(DoesNotFit, match="cannot be chunked further"):
        fit(plans, shape, floor - 1, groups)


def test_the_executor_honours_its_chunk_groups(tiny_checkpoints):
    """In the tiny model FFN and logits cannot lower the peak: restricted to them the search fails
    where the unrestricted one fits."""
    roomy = (
        LLM(tiny_checkpoints["llada"], dtype=torch.bfloat16)
        .executor.plan_for(RequestShape(1, 200, 64))
        .predicted_peak_bytes
    )
    budget = int(roomy * 0.9)
    restricted = LLM(
        tiny_checkpoints["llada"], dtype=torch.bfloat16, memory_budget=budget, chunk_groups=("ffn", "logits")
    )
    with pytest.raises(DoesNotFit, match="cannot be chunked further"):
        restricted.executor.plan_for(RequestShape(1, 200, 64))
    free = LLM(tiny_checkpoints["llada"], dtype=torch.bfloat16, memory_budget=budget)
    assert free.executor.plan_for(RequestShape(1, 200, 64)).predicted_peak_bytes <= budget
    with pytest.raises(ValueError, match="unknown chunk groups"):
        LLM(tiny_checkpoints["llada"], chunk_groups=("everything",))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_the_attention_region_keeps_packed_requests_and_block_caches_exact(tiny_checkpoints, family):
    """Attention in query blocks runs the whole attention block as one region (K and V first, then
    each block's q, attention, projection and residual add): packed canvases of 1600 and 900 tokens
    give each one's eager logits bit for bit, and a request decoded with a dual cache (windows
    attending to a 1600-token cache) gives the eager executor's tokens."""
    path = tiny_checkpoints[family]
    llm = LLM(path, dtype=torch.bfloat16, row_chunk=16, chunks=Chunks(attention=2), allow_long_context=True)
    eager = EagerExecutor(llm.spec, llm.checkpoint.weights)
    g = torch.Generator().manual_seed(6)
    steps = [(torch.randint(0, 300, (1, n), generator=g), torch.arange(0, n, 13)) for n in (1600, 900)]
    with llm.executor.batch_logits(steps) as reads:
        packed = [joined(read()) for read in reads]
    assert llm.executor.last_plan.graph.shape.chunks.attention == 2
    for (ids, rows), got in zip(steps, packed, strict=True):
        assert torch.equal(got, eager.logits(ids)[:, rows])
    prompt = torch.randint(0, 300, (1568,), generator=g).tolist()
    cfg = GenerationConfig(gen_length=32, steps=32, block_length=16, threshold=0.05, cache="dual", temperature=0.0)
    options = ({"executor": "eager"}, {})
    outs = [LLM(path, dtype=torch.bfloat16, allow_long_context=True, **o).generate(prompt, cfg)[0] for o in options]
    region = llm.generate(prompt, cfg)[0]
    assert region.token_ids == outs[0].token_ids == outs[1].token_ids
