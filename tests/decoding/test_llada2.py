"""LLaDA2.x (block diffusion, no cache: the official generate recomputes its prefix at every step)
gives the tokens of a restatement of its published loop (tests/reference.py `llada2_generate` over
`llada2_forward`: modeling_llada2_moe's generate and forward), bf16 and fp32, temperature 0 and
> 0, top-k / top-p, threshold, minimal_topk, the early stop at EOS; eager and Mosaic, alone,
batched and under a budget that chunks its steps."""

from __future__ import annotations

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.config import GenerationConfigError
from mosaic_dllm.engine import ContextTooLong
from mosaic_dllm.models.groups import Chunks
from tests import reference

PROMPTS = {
    "inside a block": [5, 17],
    "one block": [5, 17, 42, 99],
    "two blocks and a partial one": [5, 17, 42, 99, 7, 64, 12, 8, 33, 21],
}
SETTINGS = [
    dict(block_length=4, steps=4),  # generate()'s defaults otherwise: greedy, threshold 0.95
    dict(block_length=4, steps=2, temperature=0.7, top_k=40),
    dict(block_length=8, steps=8, temperature=1.0, top_p=0.9, threshold=0.05),
    dict(block_length=4, steps=8, temperature=0.5, threshold=0.3),
    dict(block_length=8, steps=8, minimal_topk=3, temperature=0.9),
    dict(block_length=4, steps=4, temperature=1.2, stop_at_eos=True),
]
GEN = 12


@pytest.fixture(scope="module")
def llada2_path(tiny_checkpoints):
    return tiny_checkpoints["llada2"]


def official(llm: LLM, prompt: list[int], cfg: GenerationConfig, greedy_at_zero: bool = True) -> tuple[list, int]:
    """The restated published loop's answer (to gen_length) and forward passes: LLaDA2.0's generate,
    or with `editing_threshold` LLaDA2.1's."""
    config, state = reference.load_state(llm.checkpoint.path, llm.checkpoint.dtype)
    cfg = llm.resolve(cfg, len(prompt))
    torch.manual_seed(cfg.seed)
    ids, sampling = torch.tensor([prompt]), (cfg.temperature, cfg.top_k, cfg.top_p, cfg.threshold)
    common = (config, state, ids, llm.spec.mask_token_id, llm.spec.eos_token_ids[0], cfg.gen_length, cfg.block_length)
    if cfg.editing_threshold is not None:
        editing = (cfg.editing_threshold, cfg.max_post_steps, cfg.num_to_transfer)
        x, passes = reference.llada21_generate(*common, *sampling, *editing, cfg.stop_at_eos)
    else:
        x, passes = reference.llada2_generate(
            *common, cfg.steps, *sampling, cfg.minimal_topk, cfg.stop_at_eos, greedy_at_zero
        )
    return x[0, len(prompt) :].tolist(), passes


def check(llms: list[LLM], prompt: list[int], cfg: GenerationConfig) -> None:
    expected, passes = official(llms[0], prompt, cfg)
    for llm in llms:
        out = llm.generate(prompt, cfg)[0]
        assert out.token_ids == expected[: len(out.token_ids)], (llm.info.executor, prompt)
        if out.finish_reason == "length":
            assert out.token_ids == expected
        assert out.forward_passes == passes


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_tokens_equal_the_published_loop(llada2_path, settings, dtype):
    eager = LLM(llada2_path, dtype=dtype, executor="eager")
    mosaic = LLM(llada2_path, dtype=dtype, row_chunk=3)
    for prompt in PROMPTS.values():
        check([eager, mosaic], prompt, GenerationConfig(gen_length=GEN, seed=7, **settings))


def test_temperature_zero_is_greedy_where_the_published_code_samples(llada2_path):
    """The published code's temperature 0 draws from the unscaled softmax (its docstring: greedy);
    ours takes the most likely token: equal to the greedy restatement, and the published draws
    differ from it for some seed."""
    llm = LLM(llada2_path, dtype=torch.float32, executor="eager")
    prompt, greedy = PROMPTS["one block"], []
    for seed in range(4):
        cfg = GenerationConfig(gen_length=8, block_length=4, steps=4, seed=seed, temperature=0.0)
        ours = llm.generate(prompt, cfg)[0].token_ids
        assert ours == official(llm, prompt, cfg)[0][: len(ours)]
        greedy.append(ours)
        sampled = official(llm, prompt, cfg, greedy_at_zero=False)[0]
        if sampled[: len(ours)] != ours:
            break
    else:
        pytest.fail("the published sampling at temperature 0 matched greedy for every seed")
    assert all(g == greedy[0] for g in greedy)  # greedy: the seed does not matter


def test_batched_and_under_a_budget_each_request_keeps_its_tokens(llada2_path):
    """Requests of several lengths and blocks in one batch, with other settings each; then under a
    budget that chunks the largest step (the whole canvas, block-causally): each equals itself alone."""
    long_prompt = [(7 * i) % 300 for i in range(1, 90)]
    prompts = [*PROMPTS.values(), long_prompt]
    configs = [GenerationConfig(gen_length=GEN, seed=i, **SETTINGS[i % len(SETTINGS)]) for i in range(len(prompts))]
    alone = LLM(llada2_path, dtype=torch.float32, max_batch=1)
    expected = [alone.generate(p, c)[0].token_ids for p, c in zip(prompts, configs, strict=True)]
    eager = LLM(llada2_path, dtype=torch.float32, executor="eager")
    assert expected == [eager.generate(p, c)[0].token_ids for p, c in zip(prompts, configs, strict=True)]
    batched = LLM(llada2_path, dtype=torch.float32, max_batch=8)
    assert [o.token_ids for o in batched.generate(prompts, configs)] == expected

    worst = batched.request(long_prompt, configs[-1]).worst
    assert worst.masked_keys == worst.length == 104 and worst.cache_bytes == 0
    budget = int(batched.executor.plan_for(worst).predicted_peak_bytes * 0.8)
    steps = []
    tight = LLM(llada2_path, dtype=torch.float32, max_batch=8, memory_budget=budget, on_step=lambda s: steps.append(s))
    assert [o.token_ids for o in tight.generate(prompts, configs)] == expected
    plans = [s.plan for s in steps]
    assert max(p.predicted_peak_bytes for p in plans) <= budget
    assert any(p.graph.shape.masked_keys and p.graph.shape.chunks != Chunks() for p in plans)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_steps_keep_their_bits(llada2_path, dtype):
    """A long prompt's steps split into the device's query blocks (op by op and as the attention
    region) and the FFN and MoE into token chunks: the tokens equal the eager ones, and every step's
    block logits too, bit for bit, except for a chunked MoE in float32: the official code calls each
    expert once over every token of the step, and float32 GEMMs here round a row by its place in the
    call (bf16 ones do not), so a chunk's calls are within rounding of it."""
    prompt = [(11 * i) % 300 for i in range(1, 200)]
    cfg = GenerationConfig(gen_length=8, block_length=8, steps=4, seed=5, temperature=0.9)
    eager = LLM(llada2_path, dtype=dtype, executor="eager")
    expected = eager.generate(prompt, cfg)[0].token_ids
    for chunks in (Chunks(attention=3), Chunks(attention=4, norms=2, ffn=3), Chunks(projections=2, ffn=2)):
        llm = LLM(llada2_path, dtype=dtype, chunks=chunks)
        assert llm.generate(prompt, cfg)[0].token_ids == expected, chunks
        first = llm.sampler.start(torch.tensor(prompt), llm.resolve(cfg, len(prompt)), torch.Generator())
        other = eager.sampler.start(torch.tensor(prompt), eager.resolve(cfg, len(prompt)), torch.Generator())
        for _ in range(2):
            with (
                llm.executor.batch_logits([first.next_step()]) as (a,),
                eager.executor.batch_logits([other.next_step()]) as (b,),
            ):
                ours, eager_logits = first.block_logits(a), other.block_logits(b)
                if dtype == torch.float32 and chunks.ffn > 1:
                    torch.testing.assert_close(ours, eager_logits, rtol=1e-4, atol=1e-4)
                else:
                    assert torch.equal(ours, eager_logits), chunks
                first.advance(a)
                other.advance(b)


def test_nothing_is_kept_across_steps(llada2_path):
    """No cache: a request's plans count none, and a step's live tensors outside the arena stay
    within its plan's workspace (bf16, whole and in query blocks)."""
    from mosaic_dllm.memory.accounting import LiveTensorTracker

    prompt = [(11 * i) % 300 for i in range(1, 200)]
    for chunks in (Chunks(), Chunks(attention=4)):
        llm = LLM(llada2_path, dtype=torch.bfloat16, chunks=chunks)
        cfg = llm.resolve(GenerationConfig(gen_length=8, block_length=8), 199)
        assert llm.sampler.cache_bytes(cfg, 199, torch.bfloat16) == 0
        state = llm.sampler.start(torch.tensor(prompt), cfg, None)
        step = state.next_step()
        with LiveTensorTracker() as tracker, llm.executor.batch_logits([step]) as (logits,):
            state.advance(logits)
        plan = llm.executor.last_plan
        assert plan.graph.shape.masked_keys == 200 and plan.graph.shape.cache_bytes == 0
        live = max(r.live_bytes for r in tracker.timeline.records)
        assert live <= plan.workspace_bytes + plan.graph.shape.cache_bytes, chunks


def test_settings_are_checked_for_llada2(llada2_path):
    llm = LLM(llada2_path, dtype=torch.float32)
    for bad, word in [
        (dict(remasking="random"), "remasking"),
        (dict(cache="prefix"), "cache"),
        (dict(cfg_scale=1.0), "cfg_scale"),
        (dict(top_k=10_000), "top_k"),
        (dict(minimal_topk=0), "minimal_topk"),
        (dict(gen_length=4, minimal_topk=5), "minimal_topk"),
        (dict(eb_threshold=0.5), "eb_threshold"),
        (dict(cache_dtype="int8"), "cache_dtype"),
    ]:
        with pytest.raises(GenerationConfigError, match=word):
            llm.resolve(GenerationConfig(**bad))
    with pytest.raises(ContextTooLong, match="320 positions in whole blocks of 160"):  # the canvas, padded
        llm.generate([5, 17], GenerationConfig(gen_length=200, block_length=160))
    resolved = llm.resolve(GenerationConfig())
    fields = ("block_length", "steps", "temperature", "threshold", "minimal_topk", "top_k", "top_p")
    assert tuple(getattr(resolved, f) for f in fields) == (32, 32, 0.0, 0.95, 1, 0, 1.0)


def test_every_surface_runs_llada2(llada2_path, capsys):
    """The CLI (generate, info, plan with its preset), the server's stream (text as it settles)
    and lm-eval's generation; likelihood is refused with one message."""
    import json

    import openai

    from mosaic_dllm.cli import main
    from mosaic_dllm.evaluation import MosaicLM
    from tests.server.conftest import serving

    assert main(["generate", "--model", str(llada2_path), "--prompt", "Return the", "--gen-length", "8", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["family"] == "llada2" and record["settings"]["threshold"] == 0.95
    assert main(["info", str(llada2_path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["family"] == "llada2"
    assert main(["plan", "--preset", "llada2-mini", "--layers", "2", "--length", "4096"]) == 0
    report = capsys.readouterr().out
    assert "the whole canvas, block-causally" in report and "block cache" not in report

    import httpx

    llm = LLM(llada2_path, dtype=torch.float32)
    with serving(llm) as (url, _):
        page = httpx.get(url + "/", timeout=30).text
        assert "editing_threshold" in page and "minimal_topk" in page  # the page offers LLaDA2.x's settings
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)
        kw = dict(
            model=llada2_path.name,
            prompt="The quick brown fox",
            max_tokens=24,
            extra_body={"seed": 2, "temperature": 0, "block_length": 8, "steps": 4},
        )
        for extra in ({}, {"editing_threshold": 0.0, "temperature": 0.9}):  # LLaDA2.1 edits revealed tokens
            kw["extra_body"] = kw["extra_body"] | extra
            whole = client.completions.create(**kw).choices[0].text
            texts = [c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices]
            assert "".join(texts) == whole, extra

    lm = MosaicLM(pretrained=str(llada2_path), gen_length=8, temperature=0.0)
    request = type("Request", (), {"args": ("Return the", {"until": ["\n\n"]}), "task_name": None})()
    assert lm.generate_until([request]) == [
        llm.generate("Return the", GenerationConfig(gen_length=8, temperature=0.0))[0].text.split("\n\n")[0]
    ]
    with pytest.raises(ValueError, match="LLaDA2.x publishes no likelihood estimator"):
        lm.loglikelihood([type("Request", (), {"args": ("Return the", " number"), "task_name": None})()])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_group": 3}, "must split into n_group"),
        ({"topk_group": 5}, "topk_group must be in"),
        ({"num_experts_per_tok": 5}, "num_experts_per_tok must be in"),
        ({"partial_rotary_factor": 1.5}, "partial_rotary_factor"),
        ({"score_function": "softmax"}, "not supported"),
        ({"num_key_value_heads": None}, "num_key_value_heads"),
        ({"first_k_dense_replace": 1, "intermediate_size": None}, "intermediate_size"),
    ],
)
def test_bad_llada2_configs_are_refused(change, message):
    from mosaic_dllm.models import ConfigError, parse_config, to_config
    from tests.tiny import tiny_spec

    config = to_config(tiny_spec("llada2", ids={"mask": 3, "eos": 1})) | change
    with pytest.raises(ConfigError, match=message):
        parse_config(config)


def test_the_fused_projection_loads_split_quantized_and_as_a_ranks_rows(llada2_path):
    """query_key_value holds q, k and v one after another: each loads as its own weight, int8 per
    part, and a tensor-parallel rank reads its rows of each part from the file."""
    from mosaic_dllm import checkpoint
    from mosaic_dllm.models.quantized import QuantizedWeight, parse_quantization

    config, state = reference.load_state(llada2_path, torch.float32)
    fused = state["model.layers.0.attention.query_key_value.weight"]
    ck = checkpoint.load(llada2_path, dtype=torch.float32)
    q, k, v = (ck.weights.layers[0][p] for p in "qkv")
    assert torch.equal(torch.cat([q, k, v]), fused) and q.shape == (64, 64) and k.shape == v.shape == (32, 64)
    bias = state["model.layers.0.attention.query_key_value.bias"]
    assert torch.equal(torch.cat([ck.weights.layers[0][f"{p}_bias"] for p in "qkv"]), bias)
    rank1 = checkpoint.load(llada2_path, dtype=torch.float32, rank_rows=(1, 2)).weights.layers[0]
    assert (
        torch.equal(rank1["q"], q[32:]) and torch.equal(rank1["k"], k[16:]) and torch.equal(rank1["v_bias"], bias[112:])
    )
    int8 = checkpoint.load(llada2_path, dtype=torch.float32, quantization=parse_quantization("int8"))
    assert all(isinstance(int8.weights.layers[0][p], QuantizedWeight) for p in "qkv")
    assert LLM(llada2_path, dtype=torch.float32, quantize="int8").generate([5, 17], GenerationConfig(gen_length=4))


def test_an_eos_past_gen_length_ends_the_generation_but_not_the_answer(llada2_path):
    """The official EOS test reads the whole last block, past gen_length: an EOS there ends the
    generation, and the answer (its first gen_length positions) is returned whole, "length"."""
    llm = LLM(llada2_path, dtype=torch.float32)
    cfg = llm.resolve(GenerationConfig(gen_length=2, block_length=4, steps=1, threshold=0.5), 1)
    state = llm.sampler.start(torch.tensor([5]), cfg, torch.Generator())
    eos, vocab = llm.spec.eos_token_ids[0], llm.spec.vocab_size
    step = state.next_step()
    logits = torch.full((4, vocab), -30.0)
    logits[torch.arange(4), torch.tensor([7, 8, 9, eos])] = 30.0  # every row certain, the last an EOS
    state.advance(lambda: iter([(step.rows, logits[None])]))
    assert state.done and not state.result().stopped_at_eos
    assert state.result().canvas.tolist() == [5, 8, 9]


EDITING = [
    dict(block_length=4, editing_threshold=0.9),  # LLaDA2.1's defaults otherwise: greedy, 16 post steps
    dict(block_length=4, editing_threshold=0.0, threshold=0.5, max_post_steps=3, temperature=0.8, top_k=50),
    dict(block_length=8, editing_threshold=0.2, num_to_transfer=3, max_post_steps=0, temperature=1.0, top_p=0.9),
    dict(block_length=4, editing_threshold=0.05, max_post_steps=2, temperature=0.7, stop_at_eos=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("settings", EDITING, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_llada21_editing_equals_its_published_loop(llada2_path, settings, dtype):
    """LLaDA2.1's generate: masked positions revealed by threshold (at least num_to_transfer),
    revealed answer tokens of the block replaced above editing_threshold, post steps."""
    eager = LLM(llada2_path, dtype=dtype, executor="eager")
    mosaic = LLM(llada2_path, dtype=dtype, row_chunk=3)
    for prompt in PROMPTS.values():
        check([eager, mosaic], prompt, GenerationConfig(gen_length=GEN, seed=7, **settings))


def test_editing_settings_need_editing_threshold(llada2_path):
    llm = LLM(llada2_path, dtype=torch.float32)
    for bad in (dict(max_post_steps=3), dict(num_to_transfer=2)):
        with pytest.raises(GenerationConfigError, match="set editing_threshold"):
            llm.resolve(GenerationConfig(**bad))
    with pytest.raises(GenerationConfigError, match="editing_threshold"):
        llm.resolve(GenerationConfig(editing_threshold=1.5))
    resolved = llm.resolve(GenerationConfig(editing_threshold=0.5))
    assert (resolved.max_post_steps, resolved.num_to_transfer, resolved.threshold) == (16, 1, 0.95)
