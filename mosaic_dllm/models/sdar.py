"""SDAR (JetAstra/SDAR: SDAR-1.7B/4B/8B/30B-Chat; TraDo uses its model type): a block-diffusion
model, Qwen3-style dense (per-head q / k RMSNorm before rotary, grouped kv heads, no biases).

Attention is block-causal: bidirectional inside a block of `block_size` positions, causal across
blocks, blocks aligned to position 0 (`decoding/sdar.py` runs it over a growing K/V cache).
"""

from __future__ import annotations

from typing import Any

from .config_keys import SpecialIds, optional, reject_unsupported, required, resolve_special_ids
from .spec import ArchSpec, ConfigError, WeightNames

FAMILY = "sdar"
ARCHITECTURE = "SDARForCausalLM"


def matches(config: dict[str, Any]) -> bool:
    return ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == FAMILY


def parse(config: dict[str, Any], hints: SpecialIds) -> ArchSpec:
    reject_unsupported(
        config,
        FAMILY,
        {"hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False, "attention_bias": False},
    )
    hidden = required(config, "hidden_size", FAMILY)
    heads = required(config, "num_attention_heads", FAMILY)
    head_dim = int(optional(config, "head_dim", hidden // heads if hidden % heads == 0 else 0))
    if head_dim <= 0:
        raise ConfigError(
            f"{FAMILY} config.json: no 'head_dim', and hidden_size={hidden} is not divisible by {heads} heads"
        )
    mask, eos, pad = resolve_special_ids(config, hints, FAMILY)
    return ArchSpec(
        family=FAMILY,
        hidden_size=hidden,
        num_layers=required(config, "num_hidden_layers", FAMILY),
        num_heads=heads,
        num_kv_heads=int(optional(config, "num_key_value_heads", heads)),
        head_dim=head_dim,
        intermediate_size=required(config, "intermediate_size", FAMILY),
        vocab_size=required(config, "vocab_size", FAMILY),
        rope_theta=float(optional(config, "rope_theta", 10000.0)),
        rotary_dim=head_dim,
        rms_norm_eps=float(optional(config, "rms_norm_eps", 1e-6)),
        qk_norm=True,
        rope_full_precision=False,
        logit_shift=False,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(optional(config, "max_position_embeddings", 32768)),
        mask_token_id=mask,
        eos_token_ids=eos,
        pad_token_id=pad,
        block_size=int(optional(config, "block_size", 4)),
        torch_dtype=config.get("torch_dtype"),
    )


def weight_names(spec: ArchSpec) -> WeightNames:
    layer = "model.layers.{i}."
    return WeightNames(
        embed="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        lm_head="model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight",
        layer={
            "attn_norm": layer + "input_layernorm.weight",
            "q": layer + "self_attn.q_proj.weight",
            "k": layer + "self_attn.k_proj.weight",
            "v": layer + "self_attn.v_proj.weight",
            "q_norm": layer + "self_attn.q_norm.weight",
            "k_norm": layer + "self_attn.k_norm.weight",
            "o": layer + "self_attn.o_proj.weight",
            "ffn_norm": layer + "post_attention_layernorm.weight",
            "gate": layer + "mlp.gate_proj.weight",
            "up": layer + "mlp.up_proj.weight",
            "down": layer + "mlp.down_proj.weight",
        },
    )


def to_config(spec: ArchSpec) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURE],
        "model_type": FAMILY,
        "hidden_act": "silu",
        "attention_bias": False,
        "hidden_size": spec.hidden_size,
        "head_dim": spec.head_dim,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "num_hidden_layers": spec.num_layers,
        "vocab_size": spec.vocab_size,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": spec.rms_norm_eps,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "block_size": spec.block_size,
        "mask_token_id": spec.mask_token_id,
        "eos_token_id": spec.eos_token_ids[0],
        "pad_token_id": spec.pad_token_id,
        "use_sliding_window": False,
        "sliding_window": None,
        "torch_dtype": spec.torch_dtype or "float32",
    }
