"""Tiny checkpoints in each family's official layout (config keys, parameter names, tokenizer files).

Tests and examples build them in a second; the architecture knobs that distinguish the families
(GQA, qkv bias, qk-norm, dense and MoE layers, shared expert, expert bias) are all switched on.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from mosaic_dllm.checkpoint import save
from mosaic_dllm.models.spec import ArchSpec, MoESpec
from mosaic_dllm.models.weights import random_state_dict
from mosaic_dllm.train.bpe import save_tokenizer, train_bpe

SAMPLE_TEXT = [
    "Return the number of items in the container.",
    "The quick brown fox jumps over the lazy dog.",
    "Open the file and return a stream; raise an error if the file cannot be opened.",
    "A diffusion language model fills in masked tokens over several denoising steps.",
    "Memory is planned before each step runs, so the request never runs out of memory.",
] * 8


def tiny_spec(family: str, vocab_size: int = 320, *, ids: dict[str, int | None]) -> ArchSpec:
    common = dict(
        family=family,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        head_dim=16,
        intermediate_size=128,
        vocab_size=vocab_size,
        rope_theta=10000.0,
        rotary_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=256,
        mask_token_id=ids["mask"],
        eos_token_ids=(ids["eos"],),
        pad_token_id=ids["eos"],
    )
    spec = ArchSpec(**common)
    if family == "llada":
        return replace(spec, rope_full_precision=True)
    if family == "dream":
        return replace(spec, num_kv_heads=2, qkv_bias=True, logit_shift=True, rope_theta=1e6, rms_norm_eps=1e-6)
    if family == "llada_moe":
        moe = MoESpec(
            num_experts=4,
            experts_per_token=2,
            expert_intermediate_size=32,
            shared_expert_intermediate_size=48,
            expert_bias=True,
            normalize_top_k=False,
            moe_layers=(False, True),
        )
        return replace(spec, qk_norm=True, rope_theta=50000.0, moe=moe)
    if family == "sdar":
        return replace(spec, num_kv_heads=2, qk_norm=True, rope_theta=1e6, rms_norm_eps=1e-6, block_size=4)
    if family == "sdar_moe":  # SDAR-30B-A3B's kind: Qwen3-MoE layers, the first dense
        moe = MoESpec(4, 2, 32, 0, expert_bias=False, normalize_top_k=True, moe_layers=(False, True))
        return replace(tiny_spec("sdar", vocab_size, ids=ids), moe=moe)
    if family == "llada2":  # LLaDA2.x-mini's kind: fused qkv with biases, partial rotary, grouped sigmoid routing
        moe = MoESpec(
            num_experts=8,
            experts_per_token=2,
            expert_intermediate_size=32,
            shared_expert_intermediate_size=32,
            expert_bias=True,
            normalize_top_k=True,
            moe_layers=(False, True),
            score="sigmoid",
            groups=4,
            top_groups=2,
            scaling=2.5,
        )
        return replace(
            spec,
            num_kv_heads=2,
            rotary_dim=8,
            qk_norm=True,
            qkv_bias=True,
            output_bias=True,
            moe=moe,
            block_size=32,
            float_logits=True,
        )
    raise ValueError(f"unknown family {family!r}")


def build_tiny_checkpoint(
    path: str | Path,
    family: str,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    sharded: bool = False,
    std: float = 0.5,
    **sizes,
) -> ArchSpec:
    """Write a random tiny checkpoint of `family` to `path` and return its spec; `sizes` override
    the tiny spec's fields (e.g. a wider hidden size).

    A large init std gives peaked, seed-dependent logits, so that token comparisons mean something.
    """
    path = Path(path)
    tokenizer_family = {"sdar_moe": "sdar"}.get(family, family)
    tok = train_bpe(SAMPLE_TEXT, tokenizer_family, vocab_size=320)
    ids = save_tokenizer(path, tok, tokenizer_family)
    spec = replace(tiny_spec(family, tok.get_vocab_size(with_added_tokens=True), ids=ids), **sizes)
    state = random_state_dict(spec, dtype, seed=seed, std=std)
    if spec.moe is not None:  # a non-zero expert bias, so that its handling is tested
        for name in state:
            if name.endswith("expert_bias"):
                state[name] = (torch.arange(spec.moe.num_experts, dtype=torch.float32) * 0.01).to(dtype)
    save(path, spec, state, max_shard_bytes=20_000 if sharded else None)
    return spec
