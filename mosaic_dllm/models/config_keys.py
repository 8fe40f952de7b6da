"""Reading config.json values with errors that name the key, the family and what was expected."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .spec import ConfigError


@dataclass(frozen=True)
class SpecialIds:
    """Special token ids found outside config.json (generation_config.json, the tokenizer)."""

    mask_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None


def required(config: dict[str, Any], key: str, family: str, kind: type = int) -> Any:
    if key not in config or config[key] is None:
        raise ConfigError(f"{family} config.json lacks the required key '{key}'")
    value = config[key]
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{family} config.json: '{key}' must be an integer, got {value!r}")
    if kind is float and not isinstance(value, (int, float)):
        raise ConfigError(f"{family} config.json: '{key}' must be a number, got {value!r}")
    return kind(value)


def optional(config: dict[str, Any], key: str, default: Any) -> Any:
    value = config.get(key)
    return default if value is None else value


def as_id_tuple(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def resolve_special_ids(
    config: dict[str, Any], hints: SpecialIds, family: str
) -> tuple[int, tuple[int, ...], int | None]:
    """Mask, EOS and pad ids from this checkpoint's own files, never from another family's defaults."""
    mask = config.get("mask_token_id")
    if mask is None:
        mask = hints.mask_token_id
    if mask is None:
        raise ConfigError(
            f"{family} checkpoint: no mask token id in config.json, generation_config.json or the tokenizer "
            "(expected 'mask_token_id' or a special token such as <|mdm_mask|> / <|mask|>)"
        )
    eos = as_id_tuple(config.get("eos_token_id")) or hints.eos_token_ids
    if not eos:
        raise ConfigError(f"{family} checkpoint: no EOS token id in config.json, generation_config.json or tokenizer")
    pad = config.get("pad_token_id")
    if pad is None:
        pad = hints.pad_token_id
    return int(mask), tuple(dict.fromkeys(eos + hints.eos_token_ids)), pad


def reject_unsupported(config: dict[str, Any], family: str, expectations: dict[str, Any]) -> None:
    """Fail on config switches this engine does not implement, instead of computing something else."""
    for key, accepted in expectations.items():
        value = config.get(key)
        if value is None:
            continue
        ok = value in accepted if isinstance(accepted, tuple) else value == accepted
        if not ok:
            raise ConfigError(f"{family} config.json: '{key}'={value!r} is not supported (supported: {accepted!r})")
