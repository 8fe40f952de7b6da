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


def test_bad_sample_counts_are_refused(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llada"])
    with pytest.raises(ValueError, match="multiple of batch_size"):
        log_likelihood(llm.executor, torch.tensor([5]), torch.tensor([6]), 0, torch.Generator(), 10, 4)
    with pytest.raises(ValueError, match="target is empty"):
        log_likelihood(llm.executor, torch.tensor([5]), torch.tensor([], dtype=torch.long), 0, torch.Generator())
