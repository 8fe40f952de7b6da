"""Model families: each is recognised from config.json and parsed into one `ArchSpec`."""

from __future__ import annotations

from types import ModuleType
from typing import Any

from . import dream, llada, llada2, llada_moe, sdar
from .config_keys import SpecialIds
from .spec import ArchSpec, ConfigError, MoESpec, WeightNames

# LLaDA-MoE first: some of its configs say model_type "llada".
FAMILIES: dict[str, ModuleType] = {
    "llada_moe": llada_moe,
    "llada": llada,
    "dream": dream,
    "sdar": sdar,
    "llada2": llada2,
}


def family_of(config: dict[str, Any]) -> ModuleType:
    for module in FAMILIES.values():
        if module.matches(config):
            return module
    raise ConfigError(
        f"config.json describes an unknown model family (architectures={config.get('architectures')!r}, "
        f"model_type={config.get('model_type')!r}); supported: LLaDA ({llada.ARCHITECTURE}), "
        f"Dream ({dream.ARCHITECTURE}), LLaDA-MoE ({llada_moe.ARCHITECTURE}), "
        f"SDAR ({sdar.ARCHITECTURE}), LLaDA2.x ({llada2.ARCHITECTURE})"
    )


def parse_config(config: dict[str, Any], hints: SpecialIds | None = None) -> ArchSpec:
    return family_of(config).parse(config, hints or SpecialIds())


def weight_names(spec: ArchSpec) -> WeightNames:
    return FAMILIES[spec.family].weight_names(spec)


def to_config(spec: ArchSpec) -> dict[str, Any]:
    return FAMILIES[spec.family].to_config(spec)


__all__ = [
    "ArchSpec",
    "ConfigError",
    "MoESpec",
    "SpecialIds",
    "WeightNames",
    "family_of",
    "parse_config",
    "to_config",
    "weight_names",
]
