"""SDAR (JetAstra/SDAR: SDAR-1.7B/4B/8B-Chat, and SDAR-30B-A3B, the MoE one; TraDo uses its model
type): a block-diffusion model, Qwen3-style (per-head q / k RMSNorm before rotary, grouped kv heads,
no biases): dense, or Qwen3-MoE's sparse FFN (softmax router, top-k, optionally renormalised,
`mlp_only_layers` / `decoder_sparse_step` dense).

Attention is block-causal: bidirectional inside a block of `block_size` positions, causal across
blocks, blocks aligned to position 0 (`decoding/sdar.py` runs it over a growing K/V cache).
"""

from __future__ import annotations

from typing import Any

from . import qwen
from .config_keys import SpecialIds, optional, reject_unsupported, required
from .spec import ArchSpec, ConfigError, MoESpec, WeightNames

FAMILY = "sdar"
ARCHITECTURE = "SDARForCausalLM"
MOE_ARCHITECTURE = "SDARMoeForCausalLM"


def matches(config: dict[str, Any]) -> bool:
    architectures = config.get("architectures") or []
    return (
        ARCHITECTURE in architectures
        or MOE_ARCHITECTURE in architectures
        or config.get("model_type")
        in (
            FAMILY,
            "sdar_moe",
        )
    )


def moe_spec(config: dict[str, Any], layers: int) -> MoESpec | None:
    """Qwen3-MoE's sparse layers, from its keys (None: a dense SDAR)."""
    if config.get("num_experts") is None:
        return None
    step = int(optional(config, "decoder_sparse_step", 1))
    dense = set(config.get("mlp_only_layers") or [])
    moe = MoESpec(
        num_experts=required(config, "num_experts", FAMILY),
        experts_per_token=required(config, "num_experts_per_tok", FAMILY),
        expert_intermediate_size=required(config, "moe_intermediate_size", FAMILY),
        shared_expert_intermediate_size=0,
        expert_bias=False,
        normalize_top_k=bool(optional(config, "norm_topk_prob", False)),
        moe_layers=tuple(i not in dense and (i + 1) % step == 0 for i in range(layers)),
    )
    if not 0 < moe.experts_per_token <= moe.num_experts:
        raise ConfigError(f"{FAMILY} config.json: num_experts_per_tok must be in 1..num_experts")
    return moe


def parse(config: dict[str, Any], hints: SpecialIds) -> ArchSpec:
    reject_unsupported(config, FAMILY, {"attention_bias": False})
    block = int(optional(config, "block_size", 4))
    moe = moe_spec(config, required(config, "num_hidden_layers", FAMILY))
    return qwen.parse(config, hints, FAMILY, explicit_head_dim=True, qk_norm=True, block_size=block, moe=moe)


def weight_names(spec: ArchSpec) -> WeightNames:
    layer = {
        "q_norm": qwen.LAYER + "self_attn.q_norm.weight",
        "k_norm": qwen.LAYER + "self_attn.k_norm.weight",
        "router": qwen.LAYER + "mlp.gate.weight",
    }
    expert = {role: qwen.LAYER + "mlp.experts.{e}." + f"{role}_proj.weight" for role in ("gate", "up", "down")}
    return qwen.weight_names(spec, layer, expert)


def to_config(spec: ArchSpec) -> dict[str, Any]:
    moe = spec.moe
    sparse = {}
    if moe is not None:
        sparse = {
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.experts_per_token,
            "moe_intermediate_size": moe.expert_intermediate_size,
            "norm_topk_prob": moe.normalize_top_k,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, sparse_layer in enumerate(moe.moe_layers) if not sparse_layer],
        }
    return (
        sparse
        | {
            "architectures": [MOE_ARCHITECTURE if moe else ARCHITECTURE],
            "model_type": "sdar_moe" if moe else FAMILY,
            "attention_bias": False,
            "head_dim": spec.head_dim,
            "block_size": spec.block_size,
            "use_sliding_window": False,
            "sliding_window": None,
        }
        | qwen.to_config(spec)
    )
