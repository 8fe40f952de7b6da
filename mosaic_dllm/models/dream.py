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
    biases = {f"{p}_bias": qwen.LAYER + f"self_attn.{p}_proj.bias" for p in ("q", "k", "v")}
    return qwen.weight_names(spec, biases)


def to_config(spec: ArchSpec) -> dict[str, Any]:
    return {"architectures": [ARCHITECTURE], "model_type": "Dream"} | qwen.to_config(spec)
