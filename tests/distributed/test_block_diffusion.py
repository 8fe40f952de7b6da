"""Block caches across two ranks, tensor and sequence parallel, planned and eager: a block-diffusion
model (SDAR; sequence parallel shards the prefill's tokens and exchanges the block-causal calls
by query block), LLaDA2.x's steps that keep no cache (its fused qkv read as each rank's rows) and
Fast-dLLM's prefix and dual caches on LLaDA. Each rank's cache holds its
heads; the tokens are one process's."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mosaic_dllm import LLM, GenerationConfig

PROMPT = "The quick brown fox jumps over the lazy dog. Return the"
RUNS = ("tensor-parallel", "tensor-parallel-eager", "sequence-parallel", "sequence-parallel-eager")
SETTINGS = {
    "sdar": [dict(gen_length=12, seed=4), dict(gen_length=12, seed=5, temperature=0.0, remasking="sequential")],
    "llada": [dict(gen_length=16, steps=8, block_length=8, threshold=0.3, cache=c) for c in ("prefix", "dual")],
    "llada2": [dict(gen_length=12, block_length=4, steps=4, seed=4, temperature=0.8)],
}


def generated(paths: dict[str, str], executor: str) -> dict[str, torch.Tensor]:
    out = {}
    for family, path in paths.items():
        llm = LLM(path, executor=executor)
        for i, settings in enumerate(SETTINGS[family]):
            out[f"{family}{i}"] = torch.tensor(llm.generate(PROMPT, GenerationConfig(**settings))[0].token_ids)
    return out


def rank_main(rank: int, paths: dict[str, str], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=2)
    try:
        for executor in RUNS:
            save_file(generated(paths, executor), f"{out}.{executor}.{rank}")
    finally:
        dist.destroy_process_group()


def test_block_caches_across_two_ranks_give_one_process_tokens(tmp_path, tiny_checkpoints):
    paths = {family: str(tiny_checkpoints[family]) for family in SETTINGS}
    out = str(tmp_path / "ranks")
    mp.spawn(rank_main, args=(paths, out), nprocs=2)
    alone = {k: v.tolist() for k, v in generated(paths, "mosaic").items()}
    for executor in RUNS:
        for rank in range(2):
            assert {k: v.tolist() for k, v in load_file(f"{out}.{executor}.{rank}").items()} == alone, executor
