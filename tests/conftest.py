import pytest
import torch

from tests.tiny import build_tiny_checkpoint

FAMILIES = ("llada", "dream", "llada_moe")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> directory of a random tiny checkpoint in the official layout (Dream's sharded)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        build_tiny_checkpoint(path, family, dtype=torch.float32, sharded=family == "dream")
        out[family] = path
    return out
