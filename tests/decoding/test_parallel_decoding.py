"""Fast-dLLM's parallel decoding (threshold, factor, prefix and dual block caches) gives the tokens
of a restatement of Fast-dLLM's loops (tests/reference.py `fast_generate` for LLaDA and LLaDA-MoE,
`fast_dream_generate` for Dream's block sampler), bf16 and fp32, eager and Mosaic (mask-only rows
in chunks of 3), alone, batched, and under a memory budget that chunks the steps; and the caches
are counted by every plan."""

from __future__ import annotations

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.config import GenerationConfigError
from mosaic_dllm.decoding import parallel
from mosaic_dllm.models.groups import Chunks
from tests import reference

PROMPT = [5, 17, 42, 99, 7, 64]
BASE = dict(gen_length=16, steps=8, block_length=8, seed=11)

SETTINGS = [
    dict(threshold=0.02),
    dict(threshold=0.05, temperature=0.7),
    dict(factor=1.0),
    dict(factor=0.5, remasking="random", temperature=1.0),
    dict(cache="prefix"),  # the official quota per step, with a cache
    dict(cache="dual", temperature=0.8),
    dict(cache="prefix", threshold=0.05, temperature=0.7),
    dict(cache="prefix", factor=0.5, remasking="random", temperature=1.0),
    dict(cache="dual", factor=1.0, temperature=0.5),
    dict(cache="dual", threshold=0.3, remasking="random"),
]


def fast_reference(llm: LLM, family: str, settings: dict) -> tuple[list[int], int]:
    config, state = reference.load_state(llm.checkpoint.path, llm.checkpoint.dtype)
    model = reference.llada_logits if family == "llada" else reference.hf_logits
    s = BASE | {"temperature": 0.0, "remasking": "low_confidence"} | settings
    torch.manual_seed(s["seed"])
    x, passes = reference.fast_generate(
        lambda ids, past, where, presents: model(config, state, ids, past, where, presents),
        torch.tensor([PROMPT]),
        s["steps"],
        s["gen_length"],
        s["block_length"],
        s["temperature"],
        s["remasking"],
        llm.spec.mask_token_id,
        s.get("threshold"),
        s.get("factor"),
        s.get("cache"),
    )
    return x[0, len(PROMPT) :].tolist(), passes


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request):
    return request.param


@pytest.mark.parametrize("family", ["llada", "llada_moe"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_tokens_equal_fast_dllm(tiny_checkpoints, family, settings, dtype):
    expected, passes = fast_reference(LLM(tiny_checkpoints[family], dtype=dtype, executor="eager"), family, settings)
    for options in ({"executor": "eager"}, {"executor": "mosaic", "row_chunk": 3}):
        out = LLM(tiny_checkpoints[family], dtype=dtype, **options).generate(
            PROMPT, GenerationConfig(**BASE, **settings)
        )
        assert out[0].token_ids == expected, options
        assert out[0].forward_passes == passes


def test_caches_and_thresholds_change_what_the_test_compares(tiny_checkpoints, tiny_llm):
    """The comparisons above can fail: a cache changes these tokens, a threshold the forward passes."""
    llm = tiny_llm("llada", torch.float32)
    runs = {c: llm.generate(PROMPT, GenerationConfig(**BASE, factor=1.0, cache=c))[0] for c in (None, "prefix", "dual")}
    assert runs[None].token_ids != runs["prefix"].token_ids != runs["dual"].token_ids != runs[None].token_ids
    official = llm.generate(PROMPT, GenerationConfig(**BASE))[0]
    assert llm.generate(PROMPT, GenerationConfig(**BASE, threshold=0.02))[0].forward_passes < official.forward_passes


@pytest.mark.parametrize("settings", [dict(factor=3.0), dict(threshold=0.005, temperature=1.0)], ids=str)
def test_the_dual_cache_stops_a_block_after_its_steps_as_the_upstream_does(tiny_checkpoints, settings, tiny_llm):
    """Fast-dLLM's current dual cache runs a block at most steps / blocks passes: masks a block
    leaves compete again in the next block's first (whole-canvas) step, and may stay to the end."""
    capped = GenerationConfig(**(BASE | dict(steps=2, cache="dual") | settings))  # one pass a block
    expected, passes = fast_reference(tiny_llm("llada", torch.float32), "llada", capped.given())
    assert passes == 2
    for options in ({"executor": "eager"}, {"executor": "mosaic", "row_chunk": 3}):
        llm = LLM(tiny_checkpoints["llada"], dtype=torch.float32, **options)
        canvases: list[torch.Tensor] = []
        keep = canvases.append
        out = llm.generate(PROMPT, capped, callback=lambda e, keep=keep: keep(e.canvas[len(PROMPT) :].clone()))[0]
        assert (out.token_ids, out.forward_passes) == (expected, passes)
        first_block_masks = [int((c[:8] == llm.spec.mask_token_id).sum()) for c in canvases]
        assert first_block_masks[0] > first_block_masks[1]  # the second block's step revealed a leftover
        assert llm.spec.mask_token_id in out.token_ids  # and some stayed masked


def test_ties_are_broken_as_the_upstream_breaks_them():
    """The threshold forces the first most confident position; the quota takes a descending sort's
    first: on tied confidences both differ from a top-k over the candidates."""
    confidence = torch.tensor([0.1, 0.5, 0.5, -torch.inf, 0.5, 0.2], dtype=torch.float64)
    mask = confidence > -torch.inf
    assert parallel.threshold_transfer(confidence, mask, 0.9).tolist() == [1]
    assert parallel.threshold_transfer(confidence, mask, 0.15).tolist() == [1, 2, 4, 5]
    order = torch.sort(confidence, descending=True)[1]
    assert parallel.quota_transfer(confidence, mask, 2).tolist() == order[:2].tolist()
    assert parallel.quota_transfer(confidence, mask, 6).tolist() == order[mask[order]].tolist()


@pytest.mark.parametrize("family", ["llada", "llada_moe"])
def test_batched_and_under_a_budget_each_request_keeps_its_tokens(tiny_checkpoints, family):
    """Cached and uncached requests in one batch (windows next to whole canvases), then under a
    budget that chunks the steps: every request's tokens equal the reference's; every step's plan,
    caches included, within the budget."""
    path = tiny_checkpoints[family]
    llm = LLM(path, dtype=torch.float32, executor="eager")
    picked = [SETTINGS[i] for i in (0, 5, 6, 7, 8, 9)] + [{}]
    expected = [fast_reference(llm, family, s)[0] if s else None for s in picked]
    alone = LLM(path, dtype=torch.float32, max_batch=1)
    expected[-1] = alone.generate(PROMPT, GenerationConfig(**BASE))[0].token_ids  # the official sampler
    configs = [GenerationConfig(**BASE, **s) for s in picked]

    batched = LLM(path, dtype=torch.float32, max_batch=8)
    assert [o.token_ids for o in batched.generate([PROMPT] * len(configs), configs)] == expected

    worst = [batched.request(PROMPT, c).worst for c in configs]
    assert sum(w.cache_bytes for w in worst) > 0
    peak = batched.executor.plan_batch(worst).predicted_peak_bytes
    budget = int(peak * 0.7)
    steps = []  # (the step's plan, the caches of the requests it ran)
    record = lambda step: steps.append((step.plan, sum(r.worst.cache_bytes for r in step.requests)))  # noqa: E731
    tight = LLM(path, dtype=torch.float32, max_batch=8, memory_budget=budget, on_step=record)
    assert [o.token_ids for o in tight.generate([PROMPT] * len(configs), configs)] == expected
    assert max(p.predicted_peak_bytes for p, _ in steps) <= budget
    assert any(p.graph.shape.cache_keys for p, _ in steps)  # window steps ran, planned with their caches
    assert any(p.graph.shape.chunks != Chunks() for p, _ in steps)  # and chunked by the search
    assert all(p.graph.shape.cache_bytes == caches for p, caches in steps)


def test_a_request_that_fits_only_without_its_cache_is_refused_before_any_work(tiny_checkpoints):
    path = tiny_checkpoints["llada"]
    llm = LLM(path, dtype=torch.float32)
    cfg = GenerationConfig(gen_length=64, steps=64, block_length=8)
    plain = llm.executor.plan_for(llm.request(PROMPT, cfg).worst).predicted_peak_bytes
    dual = llm.request(PROMPT, GenerationConfig(**(cfg.given() | {"cache": "dual"}))).worst
    assert dual.cache_bytes > 0
    tight = LLM(path, dtype=torch.float32, memory_budget=plain + dual.cache_bytes // 2, chunk_groups=())
    assert tight.generate(PROMPT, cfg)[0].token_ids
    with pytest.raises(Exception, match="budget"):
        tight.generate(PROMPT, GenerationConfig(**(cfg.given() | {"cache": "dual"})))


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(threshold=0.0), "threshold must be in"),
        (dict(threshold=1.5), "threshold must be in"),
        (dict(factor=-1.0), "factor must be > 0"),
        (dict(threshold=0.9, factor=1.0), "not both"),
        (dict(cache="full"), "cache must be one of"),
        (dict(threshold=0.9, cfg_scale=1.0), "classifier-free guidance"),
        (dict(threshold="high"), "threshold must be a number"),
    ],
)
def test_impossible_combinations_are_refused(tiny_checkpoints, settings, message, tiny_llm):
    llm = tiny_llm("llada")
    with pytest.raises(GenerationConfigError, match=message):
        llm.generate(PROMPT, GenerationConfig(**BASE, **settings))


DREAM_SETTINGS = [
    dict(cache="prefix", threshold=0.05),
    dict(cache="dual", threshold=0.05),
    dict(cache="prefix"),  # the entropy quota
    dict(cache="dual"),
    dict(cache="prefix", threshold=0.1, temperature=0.8, top_p=0.9),
    dict(cache="dual", temperature=0.5, alg_temp=0.3),
    dict(cache="dual", steps=2),  # one step a block: the reference leaves the rest masked
]


@pytest.mark.parametrize("settings", DREAM_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_dream_tokens_equal_fast_dllm_block_sampler(tiny_checkpoints, settings, dtype, tiny_llm):
    """Dream's settings left unset resolve as the official call (temperature 0 given here, top_k 50)."""
    cfg = GenerationConfig(**(dict(gen_length=16, steps=8, block_length=8, temperature=0.0, seed=11) | settings))
    outs = [
        LLM(tiny_checkpoints["dream"], dtype=dtype, **options).generate(PROMPT, cfg)[0]
        for options in ({"executor": "eager"}, {"executor": "mosaic", "row_chunk": 3})
    ]
    s = outs[0].settings
    config, state = reference.load_state(tiny_checkpoints["dream"], dtype)
    torch.manual_seed(11)
    x = reference.fast_dream_generate(
        lambda ids, past, where, presents: reference.hf_logits(config, state, ids, past, where, presents),
        torch.tensor([PROMPT]),
        s["gen_length"],
        s["steps"],
        s["block_length"],
        s["temperature"],
        s.get("top_p"),
        s.get("top_k"),
        s.get("alg_temp"),
        s["eps"],
        tiny_llm("dream").spec.mask_token_id,
        s.get("threshold"),
        s["cache"] == "dual",
    )
    assert outs[0].token_ids == outs[1].token_ids == x[0, len(PROMPT) :].tolist()


DREAM_THRESHOLD_SETTINGS = [
    dict(threshold=0.05),
    dict(threshold=0.3, temperature=0.8, top_p=0.9),
    dict(alg="confidence_threshold", steps=4),  # Fast-dLLM's default threshold, 0.9: the last step defers
    dict(threshold=0.02, temperature=1.0, top_k=None),  # the official default top_k, 50
]


@pytest.mark.parametrize("settings", DREAM_THRESHOLD_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_dream_tokens_equal_fast_dllm_threshold_sampler(tiny_checkpoints, settings, dtype, tiny_llm):
    """Fast-dLLM's one-canvas Dream sampler (alg confidence_threshold, no cache): its tokens and its
    steps, which grow past `steps` when the last step defers."""
    cfg = GenerationConfig(**(dict(gen_length=16, steps=8, temperature=0.0, seed=11) | settings))
    outs = [
        LLM(tiny_checkpoints["dream"], dtype=dtype, **options).generate(PROMPT, cfg)[0]
        for options in ({"executor": "eager"}, {"executor": "mosaic", "row_chunk": 3})
    ]
    s = outs[0].settings
    assert s["alg"] == "confidence_threshold"
    config, state = reference.load_state(tiny_checkpoints["dream"], dtype)
    torch.manual_seed(11)
    x, steps = reference.fast_dream_threshold_generate(
        lambda ids: reference.hf_logits(config, state, ids),
        torch.tensor([PROMPT]),
        s["gen_length"],
        s["steps"],
        s["temperature"],
        s.get("top_p"),
        s.get("top_k"),
        s["threshold"],
        tiny_llm("dream").spec.mask_token_id,
    )
    assert outs[0].token_ids == outs[1].token_ids == x[0, len(PROMPT) :].tolist()
    assert outs[0].forward_passes == outs[1].forward_passes == steps
    if "steps" in settings:
        assert steps > settings["steps"]  # the comparison covers the deferring last step


def test_dream_block_requests_batched_under_a_budget_keep_their_tokens_alone(tiny_checkpoints):
    path = tiny_checkpoints["dream"]
    base = dict(gen_length=16, steps=8, temperature=0.0, seed=11)
    configs = [GenerationConfig(**(base | {"block_length": 8} | s)) for s in DREAM_SETTINGS[:6]]
    configs.append(GenerationConfig(**base, alg="maskgit_plus"))  # the official sampler alongside
    configs.append(GenerationConfig(**base, threshold=0.05))  # and the one-canvas threshold sampler
    alone = LLM(path, dtype=torch.float32, max_batch=1)
    expected = [alone.generate(PROMPT, c)[0].token_ids for c in configs]
    roomy = LLM(path, dtype=torch.float32, max_batch=8)
    peak = roomy.executor.plan_batch([roomy.request(PROMPT, c).worst for c in configs]).predicted_peak_bytes
    tight = LLM(path, dtype=torch.float32, max_batch=8, memory_budget=int(peak * 0.7))
    assert [o.token_ids for o in tight.generate([PROMPT] * len(configs), configs)] == expected


def test_dream_block_caches_change_the_tokens_compared(tiny_checkpoints, tiny_llm):
    llm = tiny_llm("dream", torch.float32)
    runs = [
        llm.generate(PROMPT, GenerationConfig(gen_length=16, steps=8, temperature=0.0, **s))[0]
        for s in (dict(cache="prefix", block_length=8), dict(cache="dual", block_length=8), {})
    ]
    assert len({tuple(r.token_ids) for r in runs}) == 3


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(threshold=0.9, block_length=8), "have no blocks"),
        (dict(threshold=0.9, steps=3), "must divide gen_length"),
        (dict(threshold=0.9, alg="maskgit_plus"), "a threshold without a cache"),
        (dict(cache="dual"), "needs blocks"),
        (dict(cache="dual", block_length=5), "divisible by block_length"),
        (dict(cache="dual", block_length=8, factor=1.0), "threshold only"),
        (dict(cache="dual", block_length=8, alg="maskgit_plus"), "ranks by entropy"),
        (dict(cache="dual", block_length=8, steps=3), "divisible by the number of blocks"),
    ],
)
def test_dream_refuses_what_fast_dllm_samplers_lack(tiny_checkpoints, settings, message, tiny_llm):
    llm = tiny_llm("dream")
    with pytest.raises(GenerationConfigError, match=message):
        llm.generate(PROMPT, GenerationConfig(**(dict(gen_length=16, steps=8) | settings)))
