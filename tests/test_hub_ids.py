"""A Hugging Face model id resolves from the local cache laid out as huggingface_hub lays it out
(blobs, snapshots of symlinks, refs), offline; a missing one gets one message saying how to get it."""

import hashlib
import os

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.checkpoint import CheckpointError
from mosaic_dllm.cli import main

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def hub_cache(root, repo_id: str, checkpoint) -> None:
    """`checkpoint`'s files as huggingface_hub caches them: blobs by hash, a snapshot of symlinks."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for file in checkpoint.iterdir():
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))


@pytest.fixture
def offline_cache(tmp_path, monkeypatch, tiny_checkpoints):
    hub_cache(tmp_path / "hub", "example-org/tiny-llada", tiny_checkpoints["llada"])
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hub"


def test_a_hub_id_loads_from_the_cache_offline(offline_cache, tiny_checkpoints, capsys, tiny_llm):
    cfg = GenerationConfig(gen_length=8, steps=8)
    by_id = LLM("example-org/tiny-llada", dtype=torch.float32)
    assert by_id.checkpoint.name == "example-org/tiny-llada"
    direct = tiny_llm("llada", torch.float32)
    assert by_id.generate([5, 17, 42], cfg)[0].token_ids == direct.generate([5, 17, 42], cfg)[0].token_ids
    assert main(["info", "example-org/tiny-llada", "--json"]) == 0
    assert '"family": "llada"' in capsys.readouterr().out


def test_a_missing_hub_id_says_how_to_get_it(offline_cache):
    with pytest.raises(CheckpointError, match=r"not-there/model is neither a directory.*offline.*hf download"):
        LLM("not-there/model")
