"""LLaDA-MoE (inclusionAI/LLaDA-MoE-7B-A1B): OLMoE-style names, softmax router without renormalisation."""

from __future__ import annotations

from typing import Any

from .config_keys import SpecialIds, optional, reject_unsupported, required, resolve_special_ids
from .spec import ArchSpec, ConfigError, MoESpec, WeightNames

FAMILY = "llada_moe"
ARCHITECTURE = "LLaDAMoEModelLM"
_EXPERT_KEYS = ("num_experts", "num_experts_per_tok", "expert_intermediate_size")


def matches(config: dict[str, Any]) -> bool:
    # Copies of the official config disagree on model_type ("llada" / "lladamoe"): trust the
    # architecture name or the expert keys instead.
    return ARCHITECTURE in (config.get("architectures") or []) or all(k in config for k in _EXPERT_KEYS)


def parse(config: dict[str, Any], hints: SpecialIds) -> ArchSpec:
    reject_unsupported(
        config,
        FAMILY,
        {"hidden_act": "silu", "rope_scaling": None, "clip_qkv": None, "moe_router_score_function": ("softmax",)},
    )
    hidden = required(config, "hidden_size", FAMILY)
    heads = required(config, "num_attention_heads", FAMILY)
    layers = required(config, "num_hidden_layers", FAMILY)
    if hidden % heads:
        raise ConfigError(f"{FAMILY} config.json: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    freq = config.get("moe_layer_freq") or [1] * layers
    if len(freq) != layers:
        raise ConfigError(f"{FAMILY} config.json: moe_layer_freq has {len(freq)} entries for {layers} layers")
    moe_layers = tuple(bool(f) for f in freq)
    dense = int(optional(config, "dense_intermediate_size", 0))
    if not all(moe_layers) and dense <= 0:
        raise ConfigError(f"{FAMILY} config.json: dense layers need a positive 'dense_intermediate_size'")
    head_dim = hidden // heads
    partial = float(optional(config, "partial_rotary_factor", 1.0))
    if not 0 < partial <= 1:
        raise ConfigError(f"{FAMILY} config.json: partial_rotary_factor={partial} must be in (0, 1]")
    mask, eos, pad = resolve_special_ids(config, hints, FAMILY)
    moe = MoESpec(
        num_experts=required(config, "num_experts", FAMILY),
        experts_per_token=required(config, "num_experts_per_tok", FAMILY),
        expert_intermediate_size=required(config, "expert_intermediate_size", FAMILY),
        shared_expert_intermediate_size=int(optional(config, "shared_expert_intermediate_size", 0)),
        expert_bias=bool(config.get("moe_router_enable_expert_bias", False)),
        normalize_top_k=False,  # hard-coded False in the official modeling file
        moe_layers=moe_layers,
    )
    if not 0 < moe.experts_per_token <= moe.num_experts:
        raise ConfigError(f"{FAMILY} config.json: num_experts_per_tok must be in 1..num_experts")
    return ArchSpec(
        family=FAMILY,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(optional(config, "num_key_value_heads", heads)),
        head_dim=head_dim,
        intermediate_size=dense,
        vocab_size=required(config, "vocab_size", FAMILY),
        rope_theta=float(required(config, "rope_theta", FAMILY, float)),
        rotary_dim=int(head_dim * partial),
        rms_norm_eps=float(optional(config, "rms_norm_eps", 1e-5)),
        qkv_bias=bool(config.get("attention_bias", False)),
        qk_norm=bool(config.get("qk_layernorm", False)),
        rope_full_precision=False,
        logit_shift=False,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(optional(config, "max_position_embeddings", 4096)),
        mask_token_id=mask,
        eos_token_ids=eos,
        pad_token_id=pad,
        moe=moe,
        torch_dtype=config.get("torch_dtype"),
    )


def weight_names(spec: ArchSpec) -> WeightNames:
    layer = "model.layers.{i}."
    names = {
        "attn_norm": layer + "input_layernorm.weight",
        "q": layer + "self_attn.q_proj.weight",
        "k": layer + "self_attn.k_proj.weight",
        "v": layer + "self_attn.v_proj.weight",
        "o": layer + "self_attn.o_proj.weight",
        "ffn_norm": layer + "post_attention_layernorm.weight",
        # dense layers (moe_layer_freq == 0)
        "gate": layer + "mlp.gate_proj.weight",
        "up": layer + "mlp.up_proj.weight",
        "down": layer + "mlp.down_proj.weight",
        # MoE layers
        "router": layer + "mlp.gate.weight",
        "expert_bias": layer + "mlp.expert_bias",
        "shared_gate": layer + "shared_expert.gate_proj.weight",
        "shared_up": layer + "shared_expert.up_proj.weight",
        "shared_down": layer + "shared_expert.down_proj.weight",
    }
    if spec.qkv_bias:
        names |= {
            "q_bias": layer + "self_attn.q_proj.bias",
            "k_bias": layer + "self_attn.k_proj.bias",
            "v_bias": layer + "self_attn.v_proj.bias",
        }
    if spec.qk_norm:
        names |= {"q_norm": layer + "self_attn.q_norm.weight", "k_norm": layer + "self_attn.k_norm.weight"}
    return WeightNames(
        embed="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        lm_head="model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight",
        layer=names,
        expert={
            "gate": layer + "mlp.experts.{e}.gate_proj.weight",
            "up": layer + "mlp.experts.{e}.up_proj.weight",
            "down": layer + "mlp.experts.{e}.down_proj.weight",
        },
    )


def to_config(spec: ArchSpec) -> dict[str, Any]:
    moe = spec.moe
    assert moe is not None
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "lladamoe",
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "num_hidden_layers": spec.num_layers,
        "dense_intermediate_size": spec.intermediate_size,
        "expert_intermediate_size": moe.expert_intermediate_size,
        "shared_expert_intermediate_size": moe.shared_expert_intermediate_size or None,
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.experts_per_token,
        "moe_layer_freq": [int(m) for m in moe.moe_layers],
        "moe_router_enable_expert_bias": moe.expert_bias,
        "moe_router_score_function": "softmax",
        "norm_topk_prob": False,
        "qk_layernorm": spec.qk_norm,
        "attention_bias": spec.qkv_bias,
        "partial_rotary_factor": spec.rotary_dim / spec.head_dim,
        "vocab_size": spec.vocab_size,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "eos_token_id": spec.eos_token_ids[0],
        "pad_token_id": spec.pad_token_id,
        "torch_dtype": spec.torch_dtype or "float32",
    }
