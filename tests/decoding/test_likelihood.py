"""LLaDA's Monte Carlo log-likelihood equals the official estimator (restated in tests/reference.py)
for the same seed, with the official full forward on one side and packed, mask-only logits on the
other."""

import pytest
import torch

from mosaic_dllm import LLM
from mosaic_dllm.decoding.likelihood import log_likelihood
from mosaic_dllm.runtime import EagerExecutor
from tests.reference import llada_log_likelihood


@pytest.mark.parametrize("family", ["llada", "llada_moe"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_the_estimate_is_the_official_value_for_the_same_seed(tiny_checkpoints, family, dtype, cfg_scale):
    llm = LLM(tiny_checkpoints[family], dtype=dtype, row_chunk=8)
    prefix, target = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([20, 21, 22, 23, 24, 25, 26])
    eager = EagerExecutor(llm.spec, llm.checkpoint.weights)
    torch.manual_seed(7)
    official = llada_log_likelihood(eager.logits, prefix, target, 8, 4, cfg_scale, llm.spec.mask_token_id)
    for executor in (llm.executor, eager):
        gen = torch.Generator().manual_seed(7)
        got = log_likelihood(executor, prefix, target, llm.spec.mask_token_id, gen, 8, 4, cfg_scale)
        assert got == official


def test_bad_sample_counts_are_refused(tiny_checkpoints, tiny_llm):
    llm = tiny_llm("llada")
    with pytest.raises(ValueError, match="multiple of batch_size"):
        log_likelihood(llm.executor, torch.tensor([5]), torch.tensor([6]), 0, torch.Generator(), 10, 4)
    with pytest.raises(ValueError, match="target is empty"):
        log_likelihood(llm.executor, torch.tensor([5]), torch.tensor([], dtype=torch.long), 0, torch.Generator())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("log_type", ["ftb", "btf", "union"])
def test_dreams_estimate_is_its_evaluations_value_for_the_same_seed(tiny_checkpoints, dtype, log_type):
    """HKUNLP/Dream eval/eval.py `_eval_target_nll_mc`, restated: per-position masking at each
    copy's level, never the first or last position, shifted logits; equal number for number with
    the official full forward and with packed, mask-only rows."""
    from mosaic_dllm.decoding.likelihood import LikelihoodOptions, dream_log_likelihood
    from tests.reference import dream_log_likelihood as official_estimate

    llm = LLM(tiny_checkpoints["dream"], dtype=dtype, row_chunk=8)
    prefix, target = torch.tensor([5, 6, 7, 8, 9, 10]), torch.tensor([20, 21, 22, 23, 24, 25, 26, 11])
    eager = EagerExecutor(llm.spec, llm.checkpoint.weights)
    options = LikelihoodOptions(mc_num=8, batch_size=4, log_type=log_type, sampling_eps=1e-3)
    torch.manual_seed(3)
    official = official_estimate(eager.logits, prefix, target, 8, 4, log_type, 1e-3, llm.spec.mask_token_id)
    for executor in (llm.executor, eager):
        got = dream_log_likelihood(
            executor, prefix, target, llm.spec.mask_token_id, torch.Generator().manual_seed(3), options
        )
        assert got == official
    other = dream_log_likelihood(
        llm.executor, prefix, target, llm.spec.mask_token_id, torch.Generator().manual_seed(4), options
    )
    assert other != official  # the comparison can fail: another seed, another estimate


def test_dreams_context_and_continuation_are_tokenised_as_its_evaluation(tiny_checkpoints, tmp_path):
    """BOS text before the context (add_bos_token), trailing spaces moved, EOS after the whole, the
    context cut on the left past max_length; guidance is refused."""
    import json
    import shutil

    from mosaic_dllm.decoding.likelihood import LikelihoodOptions
    from tests.reference import dream_encode_pair

    path = tmp_path / "dream"
    shutil.copytree(tiny_checkpoints["dream"], path)
    config = json.loads((path / "tokenizer_config.json").read_text()) | {"bos_token": "<|im_start|>"}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    llm = LLM(path)
    tok, eos = llm.tokenizer, llm.spec.eos_token_ids[0]
    for context, continuation, bos, most in [
        ("Return the number of ", "items", True, 2048),
        ("Open the file", " and read it", False, 2048),
        ("Return the number of items in the list", " now", True, 6),
        ("Return", " the number of items in the list, then the count", True, 5),
    ]:
        options = LikelihoodOptions(add_bos_token=bos, max_length=most)
        ours = llm.sampler.encode_pair(tok, context, continuation, options)
        official = dream_encode_pair(tok.encode, "<|im_start|>", eos, context, continuation, bos, most)
        assert (list(ours[0]), list(ours[1])) == (list(official[0]), list(official[1]))
    with pytest.raises(ValueError, match="no working guidance"):
        pair = (torch.tensor([5]), torch.tensor([6, 7]))
        llm.sampler.log_likelihoods(llm.executor, [pair], torch.Generator(), LikelihoodOptions(cfg_scale=1.0))


def test_the_eager_executor_runs_the_copies_as_the_official_batch(tiny_checkpoints, monkeypatch, tiny_llm):
    """The official estimator runs a Monte Carlo batch as one forward, the guidance copies after
    the conditional ones: the eager executor (the oracle) does the same, so a BLAS that rounds by
    row count cannot move it off the official value."""
    llm = tiny_llm("llada", torch.float32)
    eager = EagerExecutor(llm.spec, llm.checkpoint.weights)
    batches = []
    forward = eager.logits
    monkeypatch.setattr(eager, "logits", lambda ids: batches.append(ids.clone()) or forward(ids))
    prefix, target = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([20, 21, 22, 23, 24, 25, 26])
    mask = llm.spec.mask_token_id
    torch.manual_seed(7)
    official = llada_log_likelihood(forward, prefix, target, 8, 4, 1.5, mask)
    assert log_likelihood(eager, prefix, target, mask, torch.Generator().manual_seed(7), 8, 4, 1.5) == official
    assert [tuple(b.shape) for b in batches] == [(8, 12), (8, 12)]  # 2 runs of 4 copies and their guidance
    for ids in batches:
        assert not (ids[:4, :5] == mask).any() and (ids[4:, :5] == mask).all()  # conditional first, then guidance


@pytest.mark.parametrize("family,settings", [("llada", dict(cfg_scale=0.5)), ("dream", dict(log_type="union"))])
def test_requests_sharing_passes_keep_the_values_they_have_alone(tiny_checkpoints, family, settings, monkeypatch):
    """Several requests' Monte Carlo copies packed into shared passes: each estimate equals the one
    it gets alone (the draws come first, in request order; a row's bits do not depend on its
    pass), and the passes are fewer than the runs."""
    from mosaic_dllm.decoding.likelihood import LikelihoodOptions

    llm = LLM(tiny_checkpoints[family], dtype=torch.float32, row_chunk=8)
    pairs = [
        (torch.tensor([5, 6, 7]), torch.tensor([20, 21, 22, 23])),
        (torch.tensor([8, 9, 10, 11, 12]), torch.tensor([30, 31])),
        (torch.tensor([13]), torch.tensor([40, 41, 42, 43, 44, 45])),
    ]
    alone = LikelihoodOptions(mc_num=8, batch_size=4, copies_per_pass=0, **settings)
    gen = torch.Generator().manual_seed(5)
    expected = [llm.sampler.log_likelihoods(llm.executor, [pair], gen, alone)[0] for pair in pairs]
    passes = []
    batch_logits = llm.executor.batch_logits
    monkeypatch.setattr(
        llm.executor, "batch_logits", lambda steps, **kw: passes.append(len(steps)) or batch_logits(steps, **kw)
    )
    shared = LikelihoodOptions(mc_num=8, batch_size=4, copies_per_pass=64, **settings)
    got = llm.sampler.log_likelihoods(llm.executor, pairs, torch.Generator().manual_seed(5), shared)
    assert got == expected
    assert len(passes) < 6 and sum(passes) == 24  # 3 requests x 2 runs x 4 copies, in fewer passes


def test_llada_draws_follow_the_official_devices():
    """eval_llada.py draws each batch's start on the model's device and the permutations on the
    CPU: on a GPU those are two generators, both seeded by its one manual_seed. Two CPU generators
    stand for them here; on a CPU model they are one and the same (MosaicLM.cpu_gen is gen)."""
    from mosaic_dllm.decoding.likelihood import LikelihoodOptions, llada_runs
    from tests import reference

    prefix, target, mask = torch.tensor([5, 6, 7]), torch.tensor([20, 21, 22, 23, 24, 25]), 300
    options = LikelihoodOptions(mc_num=8, batch_size=4)
    runs = llada_runs(prefix, target, mask, torch.Generator().manual_seed(3), options, torch.Generator().manual_seed(4))
    device_gen, cpu_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    seq = torch.cat([prefix, target]).repeat(4, 1)
    prompt_index = torch.arange(seq.shape[1]) < prefix.numel()
    for run in runs:
        noisy, ratio = reference.llada_forward_process(seq, prompt_index, mask, device_gen, cpu_gen)
        assert torch.equal(torch.cat([step.ids for step in run.steps]), noisy)
        assert torch.equal(run.divisors, ratio[:, 0])
    one = llada_runs(prefix, target, mask, torch.Generator().manual_seed(3), options)  # one generator: other draws
    assert any(
        not torch.equal(a.ids, b.ids)
        for r, o in zip(runs, one, strict=True)
        for a, b in zip(r.steps, o.steps, strict=True)
    )
