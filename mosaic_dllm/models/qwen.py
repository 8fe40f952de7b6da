"""What the Qwen-style families share (Dream: Qwen2; SDAR: Qwen3): transformers' config keys and
parameter names; each family adds its quirks."""

from __future__ import annotations

from typing import Any

from .config_keys import SpecialIds, optional, reject_unsupported, required, resolve_special_ids
from .spec import ArchSpec, ConfigError, WeightNames

LAYER = "model.layers.{i}."
NAMES = {
    "attn_norm": LAYER + "input_layernorm.weight",
    "q": LAYER + "self_attn.q_proj.weight",
    "k": LAYER + "self_attn.k_proj.weight",
    "v": LAYER + "self_attn.v_proj.weight",
    "o": LAYER + "self_attn.o_proj.weight",
    "ffn_norm": LAYER + "post_attention_layernorm.weight",
    "gate": LAYER + "mlp.gate_proj.weight",
    "up": LAYER + "mlp.up_proj.weight",
    "down": LAYER + "mlp.down_proj.weight",
}


def weight_names(spec: ArchSpec, layer: dict[str, str], expert: dict[str, str] | None = None) -> WeightNames:
    """The Qwen names, with the family's own per-layer (`layer`) and per-expert ones."""
    return WeightNames(
        embed="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        lm_head="model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight",
        layer=NAMES | layer,
        expert=expert or {},
    )


def parse(config: dict[str, Any], hints: SpecialIds, family: str, explicit_head_dim: bool, **quirks: Any) -> ArchSpec:
    """The spec of a Qwen-style config.json: silu, no rope scaling, no sliding window; the head dim
    hidden / heads (or the config's `head_dim`, where the family has one); `quirks` the family's
    ArchSpec fields (biases, norms, shifts)."""
    reject_unsupported(config, family, {"hidden_act": "silu", "rope_scaling": None, "use_sliding_window": False})
    hidden = required(config, "hidden_size", family)
    heads = required(config, "num_attention_heads", family)
    head_dim = int(optional(config, "head_dim", 0)) if explicit_head_dim else 0
    if not head_dim:
        if hidden % heads:
            raise ConfigError(
                f"{family} config.json: hidden_size={hidden} is not divisible by num_attention_heads={heads}"
            )
        head_dim = hidden // heads
    mask, eos, pad = resolve_special_ids(config, hints, family)
    return ArchSpec(
        family=family,
        hidden_size=hidden,
        num_layers=required(config, "num_hidden_layers", family),
        num_heads=heads,
        num_kv_heads=int(optional(config, "num_key_value_heads", heads)),
        head_dim=head_dim,
        intermediate_size=required(config, "intermediate_size", family),
        vocab_size=required(config, "vocab_size", family),
        rope_theta=float(optional(config, "rope_theta", 10000.0)),
        rotary_dim=head_dim,
        rms_norm_eps=float(optional(config, "rms_norm_eps", 1e-6)),
        rope_full_precision=False,
        tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
        max_position_embeddings=int(optional(config, "max_position_embeddings", 32768)),
        mask_token_id=mask,
        eos_token_ids=eos,
        pad_token_id=pad,
        torch_dtype=config.get("torch_dtype"),
        **quirks,
    )


def to_config(spec: ArchSpec) -> dict[str, Any]:
    """The config keys both families write."""
    return {
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
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
        "mask_token_id": spec.mask_token_id,
        "eos_token_id": spec.eos_token_ids[0],
        "pad_token_id": spec.pad_token_id,
        "torch_dtype": spec.torch_dtype or "float32",
    }
