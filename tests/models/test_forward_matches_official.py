"""The model description run by the eager executor equals the official modeling code, bit for bit."""

import pytest
import torch

from mosaic_dllm import checkpoint
from mosaic_dllm.runtime.eager import EagerExecutor
from tests import reference
from tests.conftest import FAMILIES


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_official_forward(tiny_checkpoints, family, dtype):
    path = tiny_checkpoints[family]
    ck = checkpoint.load(path, dtype=dtype)
    config, state = reference.load_state(path, dtype)
    ids = torch.randint(0, ck.spec.vocab_size, (2, 23), generator=torch.Generator().manual_seed(3))
    ours = EagerExecutor(ck.spec, ck.weights).logits(ids)
    official = (reference.llada_logits if family == "llada" else reference.hf_logits)(config, state, ids)
    assert ours.dtype == dtype and ours.shape == (2, 23, ck.spec.vocab_size)
    assert torch.equal(ours, official)
