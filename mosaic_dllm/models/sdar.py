"""SDAR (JetAstra/SDAR: SDAR-1.7B/4B/8B/30B-Chat; TraDo uses its model type): a block-diffusion
model, Qwen3-style dense (per-head q / k RMSNorm before rotary, grouped kv heads, no biases).

Attention is block-causal: bidirectional inside a block of `block_size` positions, causal across
blocks, blocks aligned to position 0 (`decoding/sdar.py` runs it over a growing K/V cache).
"""

from __future__ import annotations

from typing import Any

from . import qwen
from .config_keys import SpecialIds, optional, reject_unsupported
from .spec import ArchSpec, WeightNames

FAMILY = "sdar"
ARCHITECTURE = "SDARForCausalLM"


def matches(config: dict[str, Any]) -> bool:
    return ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == FAMILY


def parse(config: dict[str, Any], hints: SpecialIds) -> ArchSpec:
    reject_unsupported(config, FAMILY, {"attention_bias": False})
    block = int(optional(config, "block_size", 4))
    return qwen.parse(config, hints, FAMILY, explicit_head_dim=True, qk_norm=True, block_size=block)


def weight_names(spec: ArchSpec) -> WeightNames:
    return WeightNames(
        embed="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        lm_head="model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight",
        layer=qwen.NAMES
        | {"q_norm": qwen.LAYER + "self_attn.q_norm.weight", "k_norm": qwen.LAYER + "self_attn.k_norm.weight"},
    )


def to_config(spec: ArchSpec) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": FAMILY,
        "attention_bias": False,
        "head_dim": spec.head_dim,
        "block_size": spec.block_size,
        "use_sliding_window": False,
        "sliding_window": None,
    } | qwen.to_config(spec)
