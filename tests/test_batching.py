"""Continuous batching is exact: every request's tokens, text and finish reason equal running it alone.

The requests differ in everything a request can differ in (prompt length, gen_length, steps,
blocks, temperature, remasking / alg, top_p / top_k, guidance, stop_at_eos, seed), join at
different steps, run under forced chunking and under a budget that makes the batched step chunk,
in bf16 and fp32, for every family, including a wider model whose plain GEMMs round rows
differently by row count (tests/kernels/test_tiles.py).
"""

from __future__ import annotations

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.decoding.common import GenerationCancelled
from mosaic_dllm.models.groups import Chunks
from tests.helpers import joined

PROMPTS = {
    "short": [5, 6, 7],
    "odd": [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21],
    "long": list(range(30, 56)),
}

SETTINGS = {
    "llada": [
        dict(gen_length=16, steps=8, block_length=8),
        dict(gen_length=24, steps=6, block_length=8, temperature=0.7, seed=3),
        dict(gen_length=16, steps=4, cfg_scale=1.0, temperature=0.5, seed=4),
        dict(gen_length=8, steps=8, remasking="random", seed=5, stop_at_eos=False),
    ],
    "dream": [
        dict(gen_length=16, steps=8, alg="maskgit_plus", temperature=0.0),
        dict(gen_length=24, steps=6, alg="entropy", temperature=0.5, top_p=0.9, seed=3),
        dict(gen_length=12, steps=12, alg="origin", temperature=0.7, top_k=20, seed=4),
        dict(gen_length=8, steps=4, alg="topk_margin", temperature=0.3, seed=5, stop_at_eos=False),
    ],
}
SETTINGS["llada_moe"] = SETTINGS["llada"]


def requests_of(family: str) -> list[tuple[list[int], GenerationConfig]]:
    prompts = list(PROMPTS.values())
    return [(prompts[i % len(prompts)], GenerationConfig(**s)) for i, s in enumerate(SETTINGS[family])]


def alone(path, requests, **options) -> list:
    llm = LLM(path, max_batch=1, **options)
    return [llm.generate(p, c)[0] for p, c in requests]


def same(batched, single) -> None:
    for b, s in zip(batched, single, strict=True):
        assert (b.token_ids, b.text, b.finish_reason, b.steps) == (s.token_ids, s.text, s.finish_reason, s.steps)


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_a_batch_gives_every_request_its_tokens_alone(tiny_checkpoints, family, dtype):
    requests = requests_of(family)
    llm = LLM(tiny_checkpoints[family], dtype=dtype, max_batch=8)
    batched = llm.generate([p for p, _ in requests], [c for _, c in requests])
    assert llm.scheduler.steps_run < sum(o.steps for o in batched)  # the requests shared forward passes
    same(batched, alone(tiny_checkpoints[family], requests, dtype=dtype))


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_requests_joining_at_different_steps_get_their_tokens_alone(tiny_checkpoints, family):
    requests = requests_of(family)
    llm = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, max_batch=8)
    made = [llm.request(p, c) for p, c in requests]
    for i, request in enumerate(made):  # one more request joins every two steps
        llm.scheduler.submit(request)
        for _ in range(2 * (i < len(made) - 1)):
            llm.scheduler.step()
    llm.scheduler.run(made)
    same([llm.output(r) for r in made], alone(tiny_checkpoints[family], requests, dtype=torch.bfloat16))


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_forced_chunks_and_a_budget_that_chunks_the_batch_keep_every_request_exact(tiny_checkpoints, family):
    requests = requests_of(family)
    forced = Chunks(norms=2, projections=3, rotary=2, ffn=3)
    single = alone(tiny_checkpoints[family], requests, dtype=torch.float32, chunks=forced, row_chunk=4)
    llm = LLM(tiny_checkpoints[family], dtype=torch.float32, max_batch=8, chunks=forced, row_chunk=4)
    same(llm.generate([p for p, _ in requests], [c for _, c in requests]), single)

    roomy = LLM(tiny_checkpoints[family], dtype=torch.float32, max_batch=8)
    peak = roomy.executor.plan_batch([roomy.request(p, c).worst for p, c in requests]).predicted_peak_bytes
    peaks = []
    tight = LLM(
        tiny_checkpoints[family],
        dtype=torch.float32,
        max_batch=8,
        memory_budget=int(peak * 0.7),
        on_step=lambda step: peaks.append(step.plan.predicted_peak_bytes),
    )
    same(
        tight.generate([p for p, _ in requests], [c for _, c in requests]),
        alone(tiny_checkpoints[family], requests, dtype=torch.float32),
    )
    assert max(peaks) <= int(peak * 0.7)  # every step's plan within the budget
    chosen = [r.plan.graph.shape for r in tight.executor.searches.values() if not isinstance(r, Exception)]
    assert any(len(s.lengths) > 1 and (s.chunks != Chunks() or s.chunk < 64) for s in chosen)


def test_a_wide_model_stays_exact_where_plain_gemms_round_by_row_count(wide_checkpoint):
    """fp32 rows of a 256-wide GEMM round differently in calls of 2-15 rows than of 16 or more."""
    requests = [
        (p, GenerationConfig(gen_length=8, steps=4, temperature=0.5, seed=i)) for i, p in enumerate(PROMPTS.values())
    ]
    llm = LLM(wide_checkpoint, dtype=torch.float32, max_batch=8, row_chunk=2)
    batched = llm.generate([p for p, _ in requests], [c for _, c in requests])
    same(batched, alone(wide_checkpoint, requests, dtype=torch.float32, row_chunk=2))


def test_admission_keeps_every_batched_step_within_the_budget(tiny_checkpoints):
    """A budget that holds about two requests' largest steps: the scheduler never runs more at once."""
    path = tiny_checkpoints["llada"]
    cfg = GenerationConfig(gen_length=32, steps=8, block_length=32)
    roomy = LLM(path, max_batch=8)
    one = roomy.request(PROMPTS["long"], cfg).worst
    two = roomy.executor.plan_batch([one, one]).predicted_peak_bytes
    three = roomy.executor.plan_batch([one, one, one]).predicted_peak_bytes
    budget = (two + three) // 2
    sizes = []
    # no chunking: admission alone decides
    llm = LLM(path, max_batch=8, memory_budget=budget, chunk_groups=(), on_step=lambda s: sizes.append(len(s.requests)))
    outs = llm.generate([PROMPTS["long"]] * 5, cfg)
    assert max(sizes) == 2 and len(outs) == 5
    same(outs, alone(path, [(PROMPTS["long"], cfg)] * 5))


def test_cancelling_one_request_leaves_the_others_exact(tiny_checkpoints):
    path = tiny_checkpoints["llada"]
    requests = requests_of("llada")
    llm = LLM(path, max_batch=8)
    made = [llm.request(p, c) for p, c in requests]
    made[1].callback = lambda event: event.step < 2  # stops after its second step
    for r in made:
        llm.scheduler.submit(r)
    llm.scheduler.run(made)
    with pytest.raises(GenerationCancelled):
        llm.output(made[1])
    kept = [0, 2, 3]
    same([llm.output(made[i]) for i in kept], alone(path, [requests[i] for i in kept]))


@pytest.mark.parametrize("method", ["advance", "next_step"])
def test_a_failing_request_fails_alone(tiny_checkpoints, method):
    path = tiny_checkpoints["dream"]
    requests = requests_of("dream")
    llm = LLM(path, max_batch=8)
    made = [llm.request(p, c) for p, c in requests]
    broken = made[2]
    real_start = broken.start

    def start():
        state = real_start()

        def fail(*args):
            raise RuntimeError("simulated sampler failure")

        setattr(state, method, fail)
        return state

    broken.start = start
    for r in made:
        llm.scheduler.submit(r)
    llm.scheduler.run(made)
    with pytest.raises(RuntimeError, match="simulated sampler failure"):
        llm.output(broken)
    kept = [0, 1, 3]
    same([llm.output(made[i]) for i in kept], alone(path, [requests[i] for i in kept]))


def test_max_batch_is_checked_before_loading(tmp_path):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_batch"):
            LLM(tmp_path / "nowhere", max_batch=bad)


def logits_of(read) -> torch.Tensor:
    return joined(read())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("which", ["llada", "dream", "llada_moe", "wide"])
def test_packed_logits_equal_each_request_alone_bit_for_bit(tiny_checkpoints, wide_checkpoint, which, dtype):
    """Canvases of 11, 29 and 2 x 40 tokens (guidance), rows of each, packed into one pass."""
    path = wide_checkpoint if which == "wide" else tiny_checkpoints[which]
    llm = LLM(path, dtype=dtype, row_chunk=8)
    g = torch.Generator().manual_seed(0)
    steps = [
        (torch.randint(0, 300, (1, 11), generator=g), torch.arange(3, 11)),
        (torch.randint(0, 300, (1, 29), generator=g), torch.tensor([0, 5, 6, 7, 28])),
        (torch.randint(0, 300, (2, 40), generator=g), torch.arange(20, 40)),
    ]
    with llm.executor.batch_logits(steps) as reads:
        packed = [logits_of(read) for read in reads]
    for (ids, rows), got in zip(steps, packed, strict=True):
        assert torch.equal(got, logits_of(lambda ids=ids, rows=rows: llm.executor.row_logits(ids, rows)))


def test_stream_yields_each_request_as_it_finishes(tiny_checkpoints):
    path = tiny_checkpoints["llada"]
    requests = requests_of("llada")
    llm = LLM(path, max_batch=8)
    order, outs = [], {}
    for i, out in llm.stream([p for p, _ in requests], [c for _, c in requests]):
        order.append(i)
        outs[i] = out
    assert sorted(order) == list(range(len(requests)))
    assert [outs[i].steps for i in order] == sorted(o.steps for o in outs.values())  # the shortest first
    same([outs[i] for i in range(len(requests))], alone(path, requests))
    closed = llm.stream([p for p, _ in requests], [c for _, c in requests])
    next(closed)
    closed.close()  # the others are cancelled and leave at the next step
    llm.scheduler.step()
    assert llm.scheduler.idle


def test_one_bad_setting_refuses_the_call_before_any_work(tiny_checkpoints):
    from mosaic_dllm.config import GenerationConfigError

    llm = LLM(tiny_checkpoints["llada"], max_batch=8)
    configs = [GenerationConfig(gen_length=8, steps=4), GenerationConfig(gen_length=8, steps=16)]
    with pytest.raises(GenerationConfigError, match="steps"):
        llm.generate([[5, 6], [7, 8]], configs)
    assert llm.scheduler.idle and llm.scheduler.steps_run == 0


def test_a_steady_batch_plans_once_per_rows_bucket(tiny_checkpoints):
    """Four requests alike for 32 steps: plans per logits-rows bucket (8, 4, 2, 1), not per step."""
    llm = LLM(tiny_checkpoints["llada"], max_batch=4)
    cfg = GenerationConfig(gen_length=32, steps=32, block_length=8, stop_at_eos=False)
    llm.generate([[5, 6, 7]] * 4, cfg)
    assert llm.scheduler.steps_run == 32
    # one request's check, admitting the 2nd, 3rd and 4th (the worst step: 8 rows), then 4, 2 and 1 rows
    assert llm.executor.plans.plans_made == 7


def test_the_eager_oracle_batches_by_running_each_request_alone(tiny_checkpoints):
    requests = requests_of("dream")
    llm = LLM(tiny_checkpoints["dream"], executor="eager", max_batch=8)
    batched = llm.generate([p for p, _ in requests], [c for _, c in requests])
    assert llm.scheduler.steps_run < sum(o.steps for o in batched)
    same(batched, alone(tiny_checkpoints["dream"], requests, executor="eager"))
