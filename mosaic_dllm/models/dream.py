"""Dream (Dream-org/Dream-v0-Base-7B, -Instruct-7B): Qwen2-style config keys and parameter names."""

from __future__ import annotations

from typing import Any

from . import qwen
from .config_keys import SpecialIds
from .spec import ArchSpec, WeightNames

FAMILY = "dream"
ARCHITECTURE = "DreamModel"


def matches(config: dict[str, Any]) -> bool:
    return ARCHITECTURE in (config.get("architectures") or []) or config.get("model_type") == "Dream"


def parse(config: dict[str, Any], hints: SpecialIds) -> ArchSpec:
    return qwen.parse(config, hints, FAMILY, explicit_head_dim=False, qkv_bias=True, logit_shift=True)


def weight_names(spec: ArchSpec) -> WeightNames:
    layer = qwen.LAYER
    return WeightNames(
        embed="model.embed_tokens.weight",
        final_norm="model.norm.weight",
        lm_head="model.embed_tokens.weight" if spec.tie_word_embeddings else "lm_head.weight",
        layer=qwen.NAMES
        | {
            "q_bias": layer + "self_attn.q_proj.bias",
            "k_bias": layer + "self_attn.k_proj.bias",
            "v_bias": layer + "self_attn.v_proj.bias",
        },
    )


def to_config(spec: ArchSpec) -> dict[str, Any]:
    return {"architectures": [ARCHITECTURE], "model_type": "Dream"} | qwen.to_config(spec)
