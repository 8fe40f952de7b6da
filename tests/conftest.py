import pytest
import torch

from tests.tiny import build_tiny_checkpoint

FAMILIES = ("llada", "dream", "llada_moe", "sdar", "sdar_moe", "llada2")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> directory of a random tiny checkpoint in the official layout (Dream's sharded)."""
    out = {}
    for family in FAMILIES:
        path = tmp_path_factory.mktemp(family)
        build_tiny_checkpoint(path, family, dtype=torch.float32, sharded=family == "dream")
        out[family] = path
    return out


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory):
    """A LLaDA 256 wide: fp32 GEMMs of this width round a row differently by the call's row count."""
    path = tmp_path_factory.mktemp("llada_wide")
    build_tiny_checkpoint(path, "llada", hidden_size=256, head_dim=64, rotary_dim=64, intermediate_size=512, std=0.2)
    return path


@pytest.fixture(scope="session")
def tiny_llm(tiny_checkpoints):
    """(family, dtype=None) -> one shared engine on that tiny checkpoint with default options, built
    once a session. Tests that change an engine (options, hooks, servers) build their own."""
    from mosaic_dllm import LLM

    made = {}

    def get(family: str, dtype=None):
        if (family, dtype) not in made:
            made[family, dtype] = LLM(tiny_checkpoints[family], dtype=dtype)
        return made[family, dtype]

    return get
