"""SDAR (block diffusion) gives the tokens of a restatement of its published loop
(tests/reference.py `sdar_generate`: generate.py's block_diffusion_generate over modeling_sdar's
forward), bf16 and fp32, every remasking strategy, temperature 0 and > 0, eager and Mosaic, alone,
batched and under a budget that chunks the prefill; with one forward pass fewer per block (the
store pass merged into the next block's first step); and its K/V cache is counted by every plan."""

from __future__ import annotations

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.config import GenerationConfigError
from mosaic_dllm.decoding.sdar import canvas_length
from mosaic_dllm.engine import ContextTooLong
from mosaic_dllm.models.groups import Chunks
from tests import reference

PROMPTS = {
    "inside a block": [5, 17],
    "one block": [5, 17, 42, 99],
    "prefill and a partial block": [5, 17, 42, 99, 7, 64, 12, 8, 33, 21],
}
SETTINGS = [
    dict(),  # generate.py's defaults: low_confidence_dynamic at 0.85, temperature 1
    dict(temperature=0.0),
    dict(remasking="low_confidence_static", temperature=0.0, steps=2),
    dict(remasking="low_confidence_static", temperature=0.7, top_k=40),
    dict(remasking="low_confidence_dynamic", threshold=0.05, temperature=0.8, top_p=0.9),
    dict(remasking="sequential", temperature=1.0, steps=3),
    dict(remasking="entropy_bounded", eb_threshold=0.5, temperature=0.6),
    dict(remasking="entropy_bounded", eb_threshold=4.0, temperature=0.0, block_length=8, steps=8),
]
GEN = 12


@pytest.fixture(scope="module")
def sdar_path(tiny_checkpoints):
    return tiny_checkpoints["sdar"]


def official(llm: LLM, prompt: list[int], cfg: GenerationConfig, only_masked: bool = True) -> tuple[list[int], int]:
    config, state = reference.load_state(llm.checkpoint.path, llm.checkpoint.dtype)
    cfg = llm.resolve(cfg, len(prompt))
    torch.manual_seed(cfg.seed)
    x, passes = reference.sdar_generate(
        config,
        state,
        torch.tensor([prompt]),
        llm.spec.mask_token_id,
        cfg.gen_length,
        cfg.block_length,
        cfg.steps,
        cfg.temperature,
        cfg.top_k,
        cfg.top_p,
        cfg.remasking,
        cfg.threshold,
        cfg.eb_threshold,
        list(llm.spec.eos_token_ids),
        only_masked,
    )
    return x[0, len(prompt) :].tolist(), passes


def stored_passes(prompt_length: int, cfg: GenerationConfig, answer: list[int]) -> int:
    """The official passes we do not run: the prefill and each finished block's store pass."""
    blocks = -(-(prompt_length + len(answer)) // cfg.block_length) - prompt_length // cfg.block_length
    return (prompt_length >= cfg.block_length) + blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()) or "defaults")
def test_tokens_equal_the_published_loop(sdar_path, settings, dtype):
    eager = LLM(sdar_path, dtype=dtype, executor="eager")
    mosaic = LLM(sdar_path, dtype=dtype, row_chunk=3)
    for prompt in PROMPTS.values():
        cfg = GenerationConfig(gen_length=GEN, seed=7, **settings)
        expected, passes = official(eager, prompt, cfg)
        for llm in (eager, mosaic):
            out = llm.generate(prompt, cfg)[0]
            answer = out.token_ids if out.finish_reason != "stop" else expected  # text ends at EOS
            assert out.token_ids == expected[: len(out.token_ids)], (llm.info.executor, prompt)
            assert answer == expected
            assert out.forward_passes == passes - stored_passes(len(prompt), llm.resolve(cfg, len(prompt)), expected)


def test_the_answer_runs_to_the_end_of_the_last_block(sdar_path):
    """As the official canvas: the prompt and gen_length padded to whole blocks."""
    llm = LLM(sdar_path, dtype=torch.float32)
    out = llm.generate([5, 17, 42], GenerationConfig(gen_length=6, seed=1, temperature=0.0))[0]
    assert canvas_length(3, llm.resolve(GenerationConfig(gen_length=6), 3)) == 12
    if out.finish_reason == "length":
        assert len(out.token_ids) == 9


def test_a_step_never_overwrites_what_is_revealed(sdar_path):
    """With fewer masks left in a block than the step's quota the published top-k also picks revealed
    positions, here prompt tokens, and overwrites them; we reveal masked positions only."""
    llm = LLM(sdar_path, dtype=torch.float32, executor="eager")
    prompt = [5, 17, 42, 99, 7, 64]  # the second block holds two prompt tokens and two masks
    cfg = GenerationConfig(gen_length=6, seed=3, remasking="low_confidence_static", steps=1)
    published, _ = official(llm, prompt, cfg, only_masked=False)
    config, state = reference.load_state(llm.checkpoint.path, torch.float32)
    torch.manual_seed(3)
    x, _ = reference.sdar_generate(
        config, state, torch.tensor([prompt]), llm.spec.mask_token_id, 6, 4, 1,
        remasking_strategy="low_confidence_static", only_masked=False,
    )  # fmt: skip
    assert x[0, 4:6].tolist() != prompt[4:6]  # the published loop overwrote the prompt
    ours = llm.generate(prompt, cfg)[0]
    assert ours.token_ids == official(llm, prompt, cfg)[0][: len(ours.token_ids)]
    assert ours.token_ids != published[: len(ours.token_ids)] or x[0, :6].tolist() != prompt


def test_batched_and_under_a_budget_each_request_keeps_its_tokens(sdar_path):
    """Requests at every stage (prefill, store, window steps) in one batch; then under a budget that
    chunks the prefill: every request's tokens equal its own alone; the plans count the caches."""
    long_prompt = [(7 * i) % 300 for i in range(1, 90)]
    prompts = [*PROMPTS.values(), long_prompt]
    configs = [GenerationConfig(gen_length=GEN, seed=i, **SETTINGS[i % len(SETTINGS)]) for i in range(len(prompts))]
    alone = LLM(sdar_path, dtype=torch.float32, max_batch=1)
    expected = [alone.generate(p, c)[0].token_ids for p, c in zip(prompts, configs, strict=True)]
    eager = LLM(sdar_path, dtype=torch.float32, executor="eager")
    assert expected == [eager.generate(p, c)[0].token_ids for p, c in zip(prompts, configs, strict=True)]
    batched = LLM(sdar_path, dtype=torch.float32, max_batch=8)
    assert [o.token_ids for o in batched.generate(prompts, configs)] == expected

    worst = batched.request(long_prompt, configs[-1]).worst
    assert worst.masked_keys == 88 and worst.cache_bytes > 0
    budget = int(batched.executor.plan_for(worst).predicted_peak_bytes * 0.8)
    steps = []
    tight = LLM(sdar_path, dtype=torch.float32, max_batch=8, memory_budget=budget, on_step=lambda s: steps.append(s))
    assert [o.token_ids for o in tight.generate(prompts, configs)] == expected
    plans = [s.plan for s in steps]
    assert max(p.predicted_peak_bytes for p in plans) <= budget
    assert any(p.graph.shape.masked_keys and p.graph.shape.chunks != Chunks() for p in plans)  # a chunked prefill
    assert any(p.graph.shape.cache_keys for p in plans)
    caches = [sum(r.worst.cache_bytes for r in s.requests) for s in steps]
    assert [p.graph.shape.cache_bytes for p in plans] == caches


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_a_prefill_in_query_blocks_keeps_its_bits(sdar_path, dtype):
    """A long prompt's block-causal prefill split into the device's query blocks, op by op and as
    the attention region, then its blocks' steps: the logits of every step equal the eager ones."""
    prompt = [(11 * i) % 300 for i in range(1, 200)]
    cfg = GenerationConfig(gen_length=GEN, seed=5, temperature=0.0)
    expected = LLM(sdar_path, dtype=dtype, executor="eager").generate(prompt, cfg)[0].token_ids
    for chunks in (Chunks(attention=3), Chunks(attention=4, norms=2, ffn=3), Chunks(projections=2)):
        llm = LLM(sdar_path, dtype=dtype, chunks=chunks)
        assert llm.generate(prompt, cfg)[0].token_ids == expected, chunks
        eager = LLM(sdar_path, dtype=dtype, executor="eager")
        first = llm.sampler.start(torch.tensor(prompt), llm.resolve(cfg, len(prompt)), torch.Generator())
        other = eager.sampler.start(torch.tensor(prompt), eager.resolve(cfg, len(prompt)), torch.Generator())
        for _ in range(3):
            with (
                llm.executor.batch_logits([first.next_step()]) as (a,),
                eager.executor.batch_logits([other.next_step()]) as (b,),
            ):
                assert torch.equal(first.block_logits(a), other.block_logits(b))
                first.advance(a)
                other.advance(b)


def test_admission_counts_what_a_running_request_has_left(sdar_path):
    """Past its prefill, a request's steps are a block or two against its cache: a second long
    prompt joins then, where two prefills together would not fit."""
    prompts = [[(7 * i + j) % 300 for i in range(1, 90)] for j in (0, 1)]
    cfg = GenerationConfig(gen_length=GEN, seed=1)
    alone = LLM(sdar_path, dtype=torch.float32, max_batch=1)
    expected = [alone.generate(p, cfg)[0].token_ids for p in prompts]
    a, b = (alone.request(p, cfg) for p in prompts)
    assert a.later is not None and a.later.length < a.worst.length
    both_prefills = alone.executor.plan_batch([a.worst, b.worst]).predicted_peak_bytes
    prefill_and_blocks = alone.executor.plan_batch([a.later, b.worst]).predicted_peak_bytes
    assert prefill_and_blocks < both_prefills
    steps = []
    llm = LLM(
        sdar_path,
        dtype=torch.float32,
        max_batch=2,
        memory_budget=(prefill_and_blocks + both_prefills) // 2,
        on_step=lambda s: steps.append(len(s.requests)),
        chunk_groups=(),  # the plans as above, unchunked
    )
    assert [o.token_ids for o in llm.generate(prompts, cfg)] == expected
    assert steps[:2] == [1, 2]  # the second joined after the first's prefill


@pytest.mark.parametrize("cache_dtype", ["model", "int8"])
def test_the_cache_holds_what_the_plan_counts(sdar_path, cache_dtype):
    """The K/V cache a request allocates is the bytes its plans count, at its largest (int8: the
    codes, their scales and the scratch they pass through)."""
    for dtype in (torch.float32, torch.bfloat16):
        llm = LLM(sdar_path, dtype=dtype)
        prompt = PROMPTS["prefill and a partial block"]
        cfg = llm.resolve(GenerationConfig(gen_length=GEN, seed=1, cache_dtype=cache_dtype), 10)
        state = llm.sampler.start(torch.tensor(prompt), cfg, torch.Generator().manual_seed(1))
        caches = []
        while not state.done:
            step = state.next_step()
            with llm.executor.batch_logits([step]) as (logits,):
                state.advance(logits)
            cache = state.cache
            if cache.keys:
                held = [*cache.keys, *cache.values, *(t for pair in cache.scales for t in pair)]
                caches.append(sum(t.nbytes for t in held) + (cache.scratch.nbytes if cache.scratch is not None else 0))
        assert caches and set(caches) == {llm.sampler.cache_bytes(cfg, len(prompt), dtype)}
        positions = canvas_length(10, cfg) - cfg.block_length
        item = 1 if cache_dtype == "int8" else dtype.itemsize
        assert caches[0] >= 2 * positions * llm.spec.num_layers * llm.spec.kv_size * item


def test_an_int8_cache_is_an_approximation_that_plans_smaller(sdar_path):
    """cache_dtype int8: its tokens come from dequantized keys and values (close to, not equal to,
    the model dtype's); "auto" keeps the model's dtype when it fits and takes int8 when only that
    fits the budget."""
    llm = LLM(sdar_path, dtype=torch.bfloat16)
    prompt = [(7 * i) % 300 for i in range(1, 90)]
    exact, int8 = (GenerationConfig(gen_length=GEN, seed=3, temperature=0.0, cache_dtype=c) for c in ("model", "int8"))
    assert llm.request(prompt, int8).worst.cache_bytes < llm.request(prompt, exact).worst.cache_bytes
    assert len(llm.generate(prompt, int8)[0].token_ids) == len(llm.generate(prompt, exact)[0].token_ids)
    auto = GenerationConfig(gen_length=GEN, seed=3, temperature=0.0, cache_dtype="auto")
    assert llm.generate(prompt, auto)[0].settings["cache_dtype"] == "model"
    budget = llm.executor.plan_for(llm.request(prompt, int8).worst).predicted_peak_bytes
    tight = LLM(sdar_path, dtype=torch.bfloat16, memory_budget=budget, chunk_groups=())
    assert tight.generate(prompt, auto)[0].settings["cache_dtype"] == "int8"


def test_settings_are_checked_for_sdar(sdar_path):
    llm = LLM(sdar_path, dtype=torch.float32)
    for bad, word in [
        (dict(remasking="random"), "remasking"),
        (dict(cache="prefix"), "cache"),
        (dict(cfg_scale=1.0), "cfg_scale"),
        (dict(top_k=10_000), "top_k"),
        (dict(eb_threshold=0.0), "eb_threshold"),
    ]:
        with pytest.raises(GenerationConfigError, match=word):
            llm.resolve(GenerationConfig(**bad))
    resolved = llm.resolve(GenerationConfig())
    assert (resolved.block_length, resolved.steps, resolved.temperature, resolved.remasking, resolved.threshold) == (
        4,
        4,
        1.0,
        "low_confidence_dynamic",
        0.85,
    )
    with pytest.raises(ContextTooLong, match="320 positions in whole blocks of 160"):  # the canvas, padded
        llm.generate([5, 17], GenerationConfig(gen_length=200, block_length=160))


def test_every_surface_runs_sdar(sdar_path, capsys):
    """The CLI (generate, info, plan with its preset), the server's stream (text by block, as each
    block settles) and lm-eval's generation; likelihood is refused with one message."""
    import json

    import httpx
    import openai

    from mosaic_dllm.cli import main
    from mosaic_dllm.evaluation import MosaicLM
    from tests.server.conftest import serving

    assert main(["generate", "--model", str(sdar_path), "--prompt", "Return the", "--gen-length", "8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["family"] == "sdar" and record["settings"]["remasking"] == "low_confidence_dynamic"
    assert main(["info", str(sdar_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "sdar"
    assert main(["plan", "--preset", "sdar-8b", "--layers", "2", "--length", "4096"]) == 0
    report = capsys.readouterr().out
    assert "block-causal prefill of 2048 prompt positions" in report and "block cache" in report

    llm = LLM(sdar_path, dtype=torch.float32)
    with serving(llm) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(
            model=sdar_path.name, prompt="The quick brown fox", max_tokens=24, extra_body={"seed": 2, "temperature": 0}
        )
        whole = client.completions.create(**kw).choices[0].text
        texts = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
        page = httpx.get(url + "/", timeout=30).text
    assert "eb_threshold" in page and "low_confidence_dynamic" in page  # the page offers SDAR's settings
    assert "".join(texts) == whole
    assert len([t for t in texts if t]) >= 2  # blocks settled one after another, before the end

    lm = MosaicLM(pretrained=str(sdar_path), gen_length=8, temperature=0.0)
    request = type("Request", (), {"args": ("Return the", {"until": ["\n\n"]}), "task_name": None})()
    assert lm.generate_until([request]) == [
        llm.generate("Return the", GenerationConfig(gen_length=8, temperature=0.0))[0].text.split("\n\n")[0]
    ]
    with pytest.raises(ValueError, match="SDAR publishes no likelihood estimator"):
        lm.loglikelihood([type("Request", (), {"args": ("Return the", " number"), "task_name": None})()])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"block_size": 0}, "'block_size' must be positive"),
        ({"attention_bias": True}, "'attention_bias'=True is not supported"),
        ({"head_dim": None, "hidden_size": 66}, "not divisible"),
        ({"use_sliding_window": True}, "not supported"),
    ],
)
def test_bad_sdar_configs_are_refused(change, message):
    from mosaic_dllm.models import ConfigError, parse_config, to_config
    from tests.tiny import tiny_spec

    config = to_config(tiny_spec("sdar", ids={"mask": 3, "eos": 1})) | change
    with pytest.raises(ConfigError, match=message):
        parse_config(config)


def test_a_prefill_allocates_outside_the_arena_only_what_its_plan_declares(sdar_path):
    """The block-causal mask, the attention output and the K/V cache the prefill stores: the live
    tensors outside the arena stay within the step plan's workspace and cache (bf16, whole and in
    query blocks)."""
    from mosaic_dllm.memory.accounting import LiveTensorTracker

    prompt = [(11 * i) % 300 for i in range(1, 200)]
    for chunks in (Chunks(), Chunks(attention=4)):
        llm = LLM(sdar_path, dtype=torch.bfloat16, chunks=chunks)
        state = llm.sampler.start(torch.tensor(prompt), llm.resolve(GenerationConfig(gen_length=8), 199), None)
        step = state.next_step()
        with LiveTensorTracker() as tracker, llm.executor.batch_logits([step]) as (logits,):
            state.advance(logits)
        plan = llm.executor.last_plan
        assert plan.graph.shape.masked_keys == 196
        live = max(r.live_bytes for r in tracker.timeline.records)
        assert live <= plan.workspace_bytes + plan.graph.shape.cache_bytes


@pytest.mark.parametrize(
    ("first", "queries", "keys", "block"), [(0, 8, 8, 4), (2, 7, 12, 4), (5, 3, 9, 4), (0, 13, 16, 3)]
)
def test_the_block_causal_mask_is_the_official_one(first, queries, keys, block):
    """Rows of generate.py's mask (`tril` of blocks, repeated), as SDPA turns a bool mask additive."""
    from mosaic_dllm.models.kv_cache import block_causal_mask

    blocks = -(-max(first + queries, keys) // block)
    official = torch.tril(torch.ones(blocks, blocks)).repeat_interleave(block, 0).repeat_interleave(block, 1).bool()
    rows = official[first : first + queries, :keys]
    expected = torch.zeros(rows.shape).masked_fill_(~rows, float("-inf"))
    assert torch.equal(block_causal_mask(first, queries, keys, block, torch.float32, "cpu"), expected)


def test_plan_max_len_of_a_block_diffusion_model(sdar_path, capsys):
    """`mosaic plan --max-len`: each length's own first step (its prefill grows with the prompt, its
    cache with the whole, both within the budget); the step at mosaic's length fits, one longer does not."""
    import json

    from mosaic_dllm.bench.capacity import first_step_shape
    from mosaic_dllm.checkpoint import read_spec
    from mosaic_dllm.cli import main
    from mosaic_dllm.plan.search import DoesNotFit, fit
    from mosaic_dllm.plan.step_plan import PlanCache

    budget = 200 * 1024
    assert main(["plan", "--model", str(sdar_path), "--max-len", "--budget", f"{budget}B", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    eager, mosaic = (record["executors"][e]["max_len"] for e in ("eager", "mosaic"))
    assert 0 < eager < mosaic
    spec, plans = read_spec(sdar_path)[0], PlanCache(read_spec(sdar_path)[0], torch.float32)
    step = first_step_shape(spec, torch.float32, mosaic, 0.5, 64)
    assert step.masked_keys and step.cache_bytes and fit(plans, step, budget).plan.predicted_peak_bytes <= budget
    with pytest.raises(DoesNotFit):
        fit(plans, first_step_shape(spec, torch.float32, mosaic + 8, 0.5, 64), budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_sdar_moe_tokens_equal_the_published_loop(tiny_checkpoints, dtype):
    """SDAR-MoE (Qwen3-MoE layers, the first dense): the published loop's tokens, eager and Mosaic
    (its MoE in token chunks)."""
    path = tiny_checkpoints["sdar_moe"]
    eager = LLM(path, dtype=dtype, executor="eager")
    assert eager.spec.moe is not None and eager.spec.moe.moe_layers == (False, True)
    for prompt, settings in (
        (PROMPTS["prefill and a partial block"], SETTINGS[0]),
        (PROMPTS["one block"], SETTINGS[4]),
    ):
        cfg = GenerationConfig(gen_length=GEN, seed=9, **settings)
        expected, _ = official(eager, prompt, cfg)
        for llm in (eager, LLM(path, dtype=dtype, chunks=Chunks(ffn=2))):
            out = llm.generate(prompt, cfg)[0]
            assert out.token_ids == expected[: len(out.token_ids)], llm.info.executor
