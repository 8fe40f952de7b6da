"""LLaDA2.x (inclusionAI LLaDA2.0 / 2.1 mini and flash, `LLaDA2MoeModelLM`, model type `llada2_moe`):
a block-diffusion BailingMoeV2-style MoE, restated from its modeling file (`modeling_llada2_moe.py`
and `configuration_llada2_moe.py` of the 2.0 release, as vendored by the dllm library:
yks23/Information-Gain-Sampler `dllm/dllm/pipelines/llada2/models/` at f1cb636).

Attention: one fused `query_key_value` projection (q, k, v rows one after another: split at load),
per-head q / k RMSNorm before rotary, partial rotary (`partial_rotary_factor`, 0.5 unless the config
says otherwise), an output projection `dense` with a bias when `use_bias`. FFN: the first
`first_k_dense_replace` layers dense, the others sparse with the sigmoid router (`MoESpec`, score
"sigmoid": float32 router, expert bias for choosing, group-limited top-k, `routed_scaling_factor`)
and `num_shared_experts` shared experts of `moe_intermediate_size` each, as one MLP.
Attention is block-causal over the decoding's blocks (`decoding/llada2.py`).
"""

from __future__ import annotations

from typing import Any

from .config_keys import SpecialIds, optional, reject_unsupported, required, resolve_special_ids
from .spec import ArchSpec, ConfigError, MoESpec, WeightNames

FAMILY = "llada2"
ARCHITECTURE = "LLaDA2MoeModelLM"
MODEL_TYPE = "llada2_moe"
BLOCK_LENGTH = 32  # the official generate's block_length default (the config names none)
LAYER = "model.layers.{i}."
QKV = LAYER + "attention.query_key_value."


def matches(config: dict[str, Any]) -> bool:
    return ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == MODEL_TYPE


def moe_spec(config: dict[str, Any], layers: int) -> MoESpec | None:
    """The sparse layers from the config's keys (None: num_experts null, every layer dense)."""
    if config.get("num_experts") is None:
        return None
    experts = required(config, "num_experts", FAMILY)
    groups = int(optional(config, "n_group", 8))
    width = required(config, "moe_intermediate_size", FAMILY)
    moe = MoESpec(
        num_experts=experts,
        experts_per_token=int(optional(config, "num_experts_per_tok", 2)),
        expert_intermediate_size=width,
        shared_expert_intermediate_size=width * int(optional(config, "num_shared_experts", 0)),
        expert_bias=True,  # a buffer of every gate (zeros unless the checkpoint holds it)
        normalize_top_k=True,
        moe_layers=tuple(i >= int(optional(config, "first_k_dense_replace", 0)) for i in range(layers)),
        score="sigmoid",
        groups=groups,
        top_groups=int(optional(config, "topk_group", 4)),
        scaling=float(optional(config, "routed_scaling_factor", 2.5)),
    )
    if experts % groups or experts // groups < 2:
        raise ConfigError(
            f"{FAMILY} config.json: num_experts ({experts}) must split into n_group ({groups}) "
            "groups of at least two experts (a group scores its two best)"
        )
    if not 0 < moe.top_groups <= groups:
        raise ConfigError(f"{FAMILY} config.json: topk_group must be in 1..n_group ({groups})")
    if not 0 < moe.experts_per_token <= moe.top_groups * (experts // groups):
        raise ConfigError(
            f"{FAMILY} config.json: num_experts_per_tok must be in 1..{moe.top_groups * (experts // groups)} "
            "(the experts of topk_group groups)"
        )
    return moe


def parse(config: dict[str, Any], hints: SpecialIds) -> ArchSpec:
    reject_unsupported(config, FAMILY, {"hidden_act": "silu", "rope_scaling": None, "score_function": ("sigmoid",)})
    hidden = required(config, "hidden_size", FAMILY)
    heads = required(config, "num_attention_heads", FAMILY)
    layers = required(config, "num_hidden_layers", FAMILY)
    head_dim = int(optional(config, "head_dim", 0)) or hidden // heads
    if not config.get("head_dim") and hidden % heads:
        raise ConfigError(f"{FAMILY} config.json: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    partial = float(optional(config, "partial_rotary_factor", 0.5))
    if not 0 < partial <= 1:
        raise ConfigError(f"{FAMILY} config.json: partial_rotary_factor={partial} must be in (0, 1]")
    moe = moe_spec(config, layers)
    dense = int(optional(config, "intermediate_size", 0))
    if (moe is None or not all(moe.moe_layers)) and dense <= 0:
        raise ConfigError(f"{FAMILY} config.json: dense layers need a positive 'intermediate_size'")
    mask, eos, pad = resolve_special_ids(config, hints, FAMILY)
    return ArchSpec(
        family=FAMILY,
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=required(config, "num_key_value_heads", FAMILY),
        head_dim=head_dim,
        intermediate_size=dense,
        vocab_size=required(config, "vocab_size", FAMILY),
        rope_theta=float(optional(config, "rope_theta", 10000.0)),
        rotary_dim=int(head_dim * partial),
        rms_norm_eps=float(optional(config, "rms_norm_eps", 1e-5)),
        qkv_bias=bool(optional(config, "use_qkv_bias", False)),
        output_bias=bool(optional(config, "use_bias", True)),
        qk_norm=bool(optional(config, "use_qk_norm", True)),
        rope_full_precision=False,
        tie_word_embeddings=bool(optional(config, "tie_word_embeddings", False)),
        max_position_embeddings=int(optional(config, "max_position_embeddings", 16384)),
        mask_token_id=mask,
        eos_token_ids=eos,
        pad_token_id=pad,
        moe=moe,
        block_size=BLOCK_LENGTH,
        float_logits=True,
        torch_dtype=config.get("torch_dtype"),
    )


def weight_names(spec: ArchSpec) -> WeightNames:
    attention = LAYER + "attention."
    layer = {
        "attn_norm": LAYER + "input_layernorm.weight",
        # the fused projection's rows, split at load (`fused` below)
        "q": QKV + "weight:q",
        "k": QKV + "weight:k",
        "v": QKV + "weight:v",
        "q_norm": attention + "query_layernorm.weight",
        "k_norm": attention + "key_layernorm.weight",
        "o": attention + "dense.weight",
        "o_bias": attention + "dense.bias",
        "ffn_norm": LAYER + "post_attention_layernorm.weight",
        "gate": LAYER + "mlp.gate_proj.weight",
        "up": LAYER + "mlp.up_proj.weight",
        "down": LAYER + "mlp.down_proj.weight",
        "router": LAYER + "mlp.gate.weight",
        "expert_bias": LAYER + "mlp.gate.expert_bias",
        "shared_gate": LAYER + "mlp.shared_experts.gate_proj.weight",
        "shared_up": LAYER + "mlp.shared_experts.up_proj.weight",
        "shared_down": LAYER + "mlp.shared_experts.down_proj.weight",
    }
    fused = {QKV + "weight": ("q", "k", "v")}
    if spec.qkv_bias:
        layer |= {f"{p}_bias": QKV + f"bias:{p}" for p in "qkv"}
        fused[QKV + "bias"] = ("q_bias", "k_bias", "v_bias")
    return WeightNames(
        embed="model.word_embeddings.weight",
        final_norm="model.norm.weight",
        lm_head="model.word_embeddings.weight" if spec.tie_word_embeddings else "lm_head.weight",
        layer=layer,
        expert={role: LAYER + "mlp.experts.{e}." + f"{role}_proj.weight" for role in ("gate", "up", "down")},
        fused=fused,
    )


def to_config(spec: ArchSpec) -> dict[str, Any]:
    moe = spec.moe
    sparse: dict[str, Any] = {"num_experts": None}
    if moe is not None:
        sparse = {
            "num_experts": moe.num_experts,
            "num_experts_per_tok": moe.experts_per_token,
            "moe_intermediate_size": moe.expert_intermediate_size,
            "num_shared_experts": moe.shared_expert_intermediate_size // moe.expert_intermediate_size,
            "n_group": moe.groups,
            "topk_group": moe.top_groups,
            "routed_scaling_factor": moe.scaling,
            "first_k_dense_replace": moe.moe_layers.index(True) if any(moe.moe_layers) else spec.num_layers,
            "score_function": "sigmoid",
        }
    return sparse | {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size or None,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "num_hidden_layers": spec.num_layers,
        "head_dim": spec.head_dim,
        "partial_rotary_factor": spec.rotary_dim / spec.head_dim,
        "use_qkv_bias": spec.qkv_bias,
        "use_bias": spec.output_bias,
        "use_qk_norm": spec.qk_norm,
        "norm_head": False,
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
