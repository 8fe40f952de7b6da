"""LLaDA (GSAI-ML/LLaDA-8B-Base, -Instruct, LLaDA-1.5): OLMo-style config keys and parameter names."""

from __future__ import annotations

from typing import Any

from .config_keys import SpecialIds, optional, reject_unsupported, required, resolve_special_ids
from .spec import ArchSpec, ConfigError, WeightNames

FAMILY = "llada"
ARCHITECTURE = "LLaDAModelLM"


def matches(config: dict[str, Any]) -> bool:
    return ARCHITECTURE in (config.get("architectures") or []) or (
        config.get("model_type") == "llada" and "d_model" in config
    )


def parse(config: dict[str, Any], hints: SpecialIds) -> ArchSpec:
    reject_unsupported(
        config,
        FAMILY,
        {
            "block_type": "llama",
            "layer_norm_type": "rms",
            "activation_type": "silu",
            "alibi": False,
            "attention_layer_norm": False,
            "scale_logits": False,
            "input_emb_norm": False,
            "clip_qkv": None,
        },
    )
    hidden = required(config, "d_model", FAMILY)
    heads = required(config, "n_heads", FAMILY)
    kv_heads = config.get("n_kv_heads")
    if kv_heads is None:
        kv_heads = 1 if config.get("multi_query_attention") else heads
    mlp = config.get("mlp_hidden_size")
    if mlp is None:
        mlp = int(required(config, "mlp_ratio", FAMILY, float) * hidden)
    vocab = config.get("embedding_size") or required(config, "vocab_size", FAMILY)
    if hidden % heads:
        raise ConfigError(f"{FAMILY} config.json: d_model={hidden} is not divisible by n_heads={heads}")
    mask, eos, pad = resolve_special_ids(config, hints, FAMILY)
    head_dim = hidden // heads
    return ArchSpec(
        family=FAMILY,
        hidden_size=hidden,
        num_layers=required(config, "n_layers", FAMILY),
        num_heads=heads,
        num_kv_heads=int(kv_heads),
        head_dim=head_dim,
        intermediate_size=int(mlp),
        vocab_size=int(vocab),
        rope_theta=float(optional(config, "rope_theta", 10000.0)),
        rotary_dim=head_dim,
        rms_norm_eps=float(optional(config, "rms_norm_eps", 1e-5)),
        qkv_bias=bool(config.get("include_qkv_bias") or config.get("include_bias")),
        qk_norm=False,
        rope_full_precision=bool(optional(config, "rope_full_precision", True)),
        logit_shift=False,
        tie_word_embeddings=bool(config.get("weight_tying", False)),
        max_position_embeddings=int(optional(config, "max_sequence_length", 4096)),
        mask_token_id=mask,
        eos_token_ids=eos,
        pad_token_id=pad,
        torch_dtype=config.get("torch_dtype"),
    )


def weight_names(spec: ArchSpec) -> WeightNames:
    block = "model.transformer.blocks.{i}."
    layer = {
        "attn_norm": block + "attn_norm.weight",
        "q": block + "q_proj.weight",
        "k": block + "k_proj.weight",
        "v": block + "v_proj.weight",
        "o": block + "attn_out.weight",
        "ffn_norm": block + "ff_norm.weight",
        "gate": block + "ff_proj.weight",
        "up": block + "up_proj.weight",
        "down": block + "ff_out.weight",
    }
    if spec.qkv_bias:
        layer |= {"q_bias": block + "q_proj.bias", "k_bias": block + "k_proj.bias", "v_bias": block + "v_proj.bias"}
    return WeightNames(
        embed="model.transformer.wte.weight",
        final_norm="model.transformer.ln_f.weight",
        lm_head="model.transformer.wte.weight" if spec.tie_word_embeddings else "model.transformer.ff_out.weight",
        layer=layer,
    )


def to_config(spec: ArchSpec) -> dict[str, Any]:
    """config.json in the official layout (for checkpoints this package writes)."""
    return {
        "architectures": [ARCHITECTURE],
        "model_type": "llada",
        "activation_type": "silu",
        "alibi": False,
        "attention_layer_norm": False,
        "block_type": "llama",
        "d_model": spec.hidden_size,
        "embedding_size": spec.vocab_size,
        "vocab_size": spec.vocab_size,
        "eos_token_id": spec.eos_token_ids[0],
        "pad_token_id": spec.pad_token_id,
        "mask_token_id": spec.mask_token_id,
        "include_bias": False,
        "include_qkv_bias": spec.qkv_bias,
        "input_emb_norm": False,
        "layer_norm_type": "rms",
        "max_sequence_length": spec.max_position_embeddings,
        "mlp_hidden_size": spec.intermediate_size,
        "n_heads": spec.num_heads,
        "n_kv_heads": spec.num_kv_heads,
        "n_layers": spec.num_layers,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope": True,
        "rope_full_precision": spec.rope_full_precision,
        "rope_theta": spec.rope_theta,
        "scale_logits": False,
        "weight_tying": spec.tie_word_embeddings,
        "torch_dtype": spec.torch_dtype or "float32",
    }
