"""A block-diffusion model (SDAR) across two ranks, tensor and sequence parallel, planned and eager
(sequence parallel: each rank a shard of the prefill's tokens, the block-causal calls exchanged
by query block): each rank's K/V cache holds its heads, and the tokens are one process's."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mosaic_dllm import LLM, GenerationConfig
from tests.tiny import build_tiny_checkpoint

PROMPT = "The quick brown fox jumps over the lazy dog. Return the"
RUNS = ("tensor-parallel", "tensor-parallel-eager", "sequence-parallel", "sequence-parallel-eager")
SETTINGS = [dict(gen_length=12, seed=4), dict(gen_length=12, seed=5, temperature=0.0, remasking="sequential")]


def generated(path: str, executor: str) -> dict[str, torch.Tensor]:
    llm = LLM(path, executor=executor)
    return {
        str(i): torch.tensor(llm.generate(PROMPT, GenerationConfig(**s))[0].token_ids) for i, s in enumerate(SETTINGS)
    }


def rank_main(rank: int, path: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=2)
    try:
        for executor in RUNS:
            save_file(generated(path, executor), f"{out}.{executor}.{rank}")
    finally:
        dist.destroy_process_group()


def test_sdar_across_two_ranks_gives_one_process_tokens(tmp_path):
    path = tmp_path / "sdar"
    build_tiny_checkpoint(path, "sdar")
    out = str(tmp_path / "tp")
    mp.spawn(rank_main, args=(str(path), out), nprocs=2)
    alone = {k: v.tolist() for k, v in generated(str(path), "mosaic").items()}
    for executor in RUNS:
        for rank in range(2):
            assert {k: v.tolist() for k, v in load_file(f"{out}.{executor}.{rank}").items()} == alone, executor
