"""The model description run by the eager executor equals the official modeling code, bit for bit."""

import pytest
import torch

from mosaic_dllm import checkpoint
from mosaic_dllm.kernels.eager import EagerOps
from mosaic_dllm.models import transformer
from mosaic_dllm.models.kv_cache import BlockCache, CacheUse
from mosaic_dllm.runtime.eager import EagerExecutor
from tests import reference
from tests.conftest import FAMILIES


def block_causal_logits(ck, ids: torch.Tensor, block: int = 4, keep_cache: bool = True) -> torch.Tensor:
    """Every row's logits of a block-diffusion canvas run as one prefill (a refresh storing it all,
    or keeping nothing: LLaDA2.x's recompute)."""
    cache = BlockCache(ck.spec, ids.shape[1]) if keep_cache else None
    use = CacheUse(cache, refresh=True, keep=ids.shape[1], block=block)
    return next(transformer.logits(EagerOps(), ck.spec, ck.weights, ids, cache=use))[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_official_forward(tiny_checkpoints, family, dtype):
    path = tiny_checkpoints[family]
    ck = checkpoint.load(path, dtype=dtype)
    config, state = reference.load_state(path, dtype)
    ids = torch.randint(0, ck.spec.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
    mask = torch.arange(23)[None] < (torch.arange(23)[:, None] // 4 + 1) * 4  # block-causal, blocks of 4
    if family.startswith("sdar"):  # the prefill's one masked call, one sequence a call
        ours = torch.cat([block_causal_logits(ck, row[None]) for row in ids])
        official = torch.cat(
            [
                reference.sdar_forward(config, state, row[None], torch.arange(23)[None], mask[None], [], True)
                for row in ids
            ]
        )
    elif family == "llada2":  # generate()'s one call with the additive mask, nothing kept
        ours = torch.cat([block_causal_logits(ck, row[None], keep_cache=False) for row in ids]).float()
        additive = torch.zeros(23, 23).masked_fill(~mask, float("-inf"))[None, None]
        official = torch.cat([reference.llada2_forward(config, state, row[None], additive) for row in ids])
    else:
        ours = EagerExecutor(ck.spec, ck.weights).logits(ids)
        official = (reference.llada_logits if family == "llada" else reference.hf_logits)(config, state, ids)
    assert ours.dtype == (torch.float32 if family == "llada2" else dtype) and ours.shape == (2, 23, ck.spec.vocab_size)
    assert torch.equal(ours, official)
