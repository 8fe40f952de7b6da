"""Mask-only logits: same rows as the full logits, replayed noise, and no L x V tensor."""

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.decoding import dream_sampling
from mosaic_dllm.decoding.rows import UniformReplay
from mosaic_dllm.memory.accounting import LiveTensorTracker
from mosaic_dllm.runtime import EagerExecutor, MosaicExecutor
from tests.helpers import joined


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_logits_match_full_logits(tiny_checkpoints, family, dtype):
    """bf16: bit-identical. fp32: BLAS may sum a row subset in another order; within 1e-5 relative."""
    llm = LLM(tiny_checkpoints[family], dtype=dtype, executor="mosaic", row_chunk=5)
    ids = torch.randint(0, llm.spec.vocab_size, (2, 29), generator=torch.Generator().manual_seed(0))
    full = EagerExecutor(llm.spec, llm.checkpoint.weights).logits(ids)
    rows = torch.tensor([0, 3, 4, 5, 11, 17, 18, 28])
    got = joined(llm.executor.row_logits(ids, rows))
    if dtype == torch.bfloat16:
        assert torch.equal(got, full[:, rows])
    else:
        torch.testing.assert_close(got, full[:, rows], rtol=1e-5, atol=1e-5)


def test_uniform_replay_reproduces_the_full_draw():
    full = torch.rand(9, 13, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    torch.rand(9, 13, dtype=torch.float64, generator=g)
    after_full = torch.rand(3, generator=g)
    g = torch.Generator().manual_seed(4)
    replay = UniformReplay(g, rows=9, vocab=13, device=torch.device("cpu"))
    assert torch.equal(replay.take(torch.tensor([1, 2, 5])), full[[1, 2, 5]])
    assert torch.equal(replay.take(torch.tensor([6])), full[[6]])
    replay.finish()
    assert torch.equal(torch.rand(3, generator=g), after_full)


def test_refused_chunk_rewinds_and_takes_the_argmax(monkeypatch):
    logits = torch.randn(6, 11, generator=torch.Generator().manual_seed(1))
    chunks = lambda: iter([(None, logits[:3]), (None, logits[3:])])  # noqa: E731
    calls = []
    monkeypatch.setattr(dream_sampling, "categorical_valid", lambda p: calls.append(1) or len(calls) != 2)
    g = torch.Generator().manual_seed(2)
    start = g.get_state()
    confidence, x0 = dream_sampling.sample_rows(chunks, g, temperature=1.0, top_p=None, top_k=None)
    assert torch.equal(x0, logits.argmax(-1))
    assert torch.equal(g.get_state(), start)


def vocabulary_rows(tracker: LiveTensorTracker, vocab: int) -> int:
    """The most rows of any vocabulary-wide tensor created during the tracked work."""
    return max(
        (
            int(torch.Size(r.shape[:-1]).numel())
            for r in tracker.timeline.records
            if r.shape and r.shape[-1] == vocab and r.new_bytes
        ),
        default=0,
    )


@pytest.mark.parametrize(
    "family,settings",
    [
        ("llada", dict(temperature=0.8, cfg_scale=1.0)),
        ("llada", dict(remasking="random")),
        ("dream", dict(alg="entropy", temperature=0.5, top_p=0.9)),
        ("dream", dict(alg="origin", temperature=0.5)),
    ],
)
def test_no_tensor_spans_the_sequence_times_the_vocabulary(tiny_checkpoints, family, settings):
    chunk, gen_length = 4, 24
    llm = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, executor="mosaic", row_chunk=chunk)
    cfg = GenerationConfig(gen_length=gen_length, steps=4, **settings)
    with LiveTensorTracker() as mosaic:
        llm.generate([5, 6, 7, 8], cfg)
    eager = LLM(tiny_checkpoints[family], dtype=torch.bfloat16, executor="eager")
    with LiveTensorTracker() as official:
        eager.generate([5, 6, 7, 8], cfg)
    batch = 2 if settings.get("cfg_scale") else 1
    # a chunk's logits, or the padded call of the batch-invariant GEMM (kernels/tiles.py)
    head = llm.executor.plans.rules.gemm(llm.spec.hidden_size, llm.spec.vocab_size)
    padded = head.padded_rows(llm.spec.hidden_size, few_rows=True)
    assert vocabulary_rows(mosaic, llm.spec.vocab_size) <= max(batch * chunk, padded) < gen_length
    assert vocabulary_rows(official, llm.spec.vocab_size) >= gen_length  # the baseline does build L x V
    assert isinstance(llm.executor, MosaicExecutor)


@pytest.mark.parametrize("dtype,exact", [(torch.bfloat16, True), (torch.float32, False)])
@pytest.mark.parametrize(
    "temperature,remasking,cfg_scale",
    [(0.0, "low_confidence", 0.0), (0.9, "low_confidence", 1.5), (0.0, "random", 0.0)],
)
def test_llada_confidences_match_the_full_logits_path(
    tiny_checkpoints, dtype, exact, temperature, remasking, cfg_scale
):
    """The step's x0 and confidences at every readable position: bit-identical in bf16, 1e-5 in fp32."""
    from mosaic_dllm.decoding import llada

    path = tiny_checkpoints["llada"]
    eager, mosaic = LLM(path, dtype=dtype, executor="eager"), LLM(path, dtype=dtype, executor="mosaic", row_chunk=3)
    mask = eager.spec.mask_token_id
    x = torch.full((1, 30), mask)
    x[0, :8] = torch.arange(8) + 10
    x[0, 12] = 5  # a revealed token inside the block
    readable = (x[0, :20] == mask).nonzero().flatten()
    prompt_index = torch.zeros_like(x, dtype=torch.bool)
    prompt_index[0, :8] = True
    outs = []
    for llm in (eager, mosaic):
        batch = llada.guidance_batch(x, prompt_index, mask, cfg_scale)
        combine = llada.cfg_combine(cfg_scale)
        chunks = ((rows, combine(lg)) for rows, lg in llm.executor.row_logits(batch, readable))
        outs.append(
            llada.propose(chunks, x, llm.spec.vocab_size, temperature, remasking, torch.Generator().manual_seed(9))
        )
    (x0_e, c_e), (x0_m, c_m) = outs
    assert torch.equal(x0_e[0, readable], x0_m[0, readable])
    if exact:
        assert torch.equal(c_e[0, readable], c_m[0, readable])
    else:
        torch.testing.assert_close(c_m[0, readable], c_e[0, readable], rtol=1e-5, atol=1e-6)
