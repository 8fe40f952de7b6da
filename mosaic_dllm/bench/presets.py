"""Real model dimensions (docs/reference.md section 2) for benchmarks with random weights.

`--layers N` keeps N layers: activation peaks are per layer, so a few layers show the full
model's activation peak at a fraction of its weights.
"""

from __future__ import annotations

from dataclasses import replace

from ..models.spec import ArchSpec, MoESpec

PRESETS: dict[str, ArchSpec] = {
    "llada-8b": ArchSpec(
        family="llada",
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=126464,
        rope_theta=500000.0,
        rotary_dim=128,
        rms_norm_eps=1e-5,
        rope_full_precision=True,
        max_position_embeddings=4096,
        mask_token_id=126336,
        eos_token_ids=(126081,),
        pad_token_id=126081,
        torch_dtype="bfloat16",
    ),
    "dream-7b": ArchSpec(
        family="dream",
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        intermediate_size=18944,
        vocab_size=152064,
        rope_theta=1000000.0,
        rotary_dim=128,
        rms_norm_eps=1e-6,
        qkv_bias=True,
        logit_shift=True,
        max_position_embeddings=131072,
        mask_token_id=151666,
        eos_token_ids=(151643,),
        pad_token_id=151643,
        torch_dtype="bfloat16",
    ),
    "llada-moe-7b": ArchSpec(
        family="llada_moe",
        hidden_size=2048,
        num_layers=16,
        num_heads=16,
        num_kv_heads=16,
        head_dim=128,
        intermediate_size=8192,
        vocab_size=157184,
        rope_theta=50000.0,
        rotary_dim=128,
        rms_norm_eps=1e-5,
        qk_norm=True,
        max_position_embeddings=8192,
        mask_token_id=156895,
        eos_token_ids=(156892,),
        pad_token_id=156892,
        moe=MoESpec(
            num_experts=64,
            experts_per_token=8,
            expert_intermediate_size=1024,
            shared_expert_intermediate_size=0,
            expert_bias=False,
            normalize_top_k=False,
            moe_layers=(True,) * 16,
        ),
        torch_dtype="bfloat16",
    ),
    "sdar-8b": ArchSpec(  # JetAstra/SDAR-8B-Chat
        family="sdar",
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        vocab_size=151936,
        rope_theta=1000000.0,
        rotary_dim=128,
        rms_norm_eps=1e-6,
        qk_norm=True,
        max_position_embeddings=32768,
        mask_token_id=151669,
        eos_token_ids=(151643, 151645),
        pad_token_id=151643,
        block_size=4,
        torch_dtype="bfloat16",
    ),
}


# JetAstra/SDAR-30B-A3B-Chat: SDAR's attention at Qwen3-30B-A3B's dimensions, its layers all MoE
PRESETS["sdar-30b-a3b"] = replace(
    PRESETS["sdar-8b"],
    hidden_size=2048,
    num_layers=48,
    num_kv_heads=4,
    intermediate_size=6144,
    moe=MoESpec(128, 8, 768, 0, expert_bias=False, normalize_top_k=True, moe_layers=(True,) * 48),
)


# inclusionAI/LLaDA2.0-mini (and 2.1-mini: the same architecture), BailingMoeV2 at Ling-mini-2.0's
# dimensions: 16B parameters, about 1.4B active; the first layer dense, the others 256 experts
PRESETS["llada2-mini"] = ArchSpec(
    family="llada2",
    hidden_size=2048,
    num_layers=20,
    num_heads=16,
    num_kv_heads=4,
    head_dim=128,
    intermediate_size=5120,
    vocab_size=157184,
    rope_theta=600000.0,
    rotary_dim=64,
    rms_norm_eps=1e-6,
    qk_norm=True,
    max_position_embeddings=32768,
    mask_token_id=156895,
    eos_token_ids=(156892,),
    pad_token_id=156892,
    moe=MoESpec(
        num_experts=256,
        experts_per_token=8,
        expert_intermediate_size=512,
        shared_expert_intermediate_size=512,
        expert_bias=True,
        normalize_top_k=True,
        moe_layers=(False,) + (True,) * 19,
        score="sigmoid",
        groups=8,
        top_groups=4,
        scaling=2.5,
    ),
    block_size=32,
    float_logits=True,
    torch_dtype="bfloat16",
)


def preset(name: str, layers: int | None = None) -> ArchSpec:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    spec = PRESETS[name]
    if layers is None:
        return spec
    if not 0 < layers <= spec.num_layers:
        raise ValueError(f"--layers must be in 1..{spec.num_layers} for {name}, got {layers}")
    moe = spec.moe and replace(spec.moe, moe_layers=spec.moe.moe_layers[:layers])
    return replace(spec, num_layers=layers, moe=moe)
