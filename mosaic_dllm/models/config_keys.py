"""Reading config.json values with errors that name the key, the family and what was expected."""

from __future__ import annotations

import math
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
    return checked(config[key], key, kind, positive=True, where=f"{family} config.json")


def optional(config: dict[str, Any], key: str, default: Any) -> Any:
    """config[key], or `default` when absent or null; a value of another kind than the default's
    (a bool, an integer >= 0 (> 0 where the default is), a finite number > 0) is refused."""
    value = config.get(key)
    if value is None:
        return default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"config.json: '{key}' must be true or false, got {value!r}")
        return value
    kind = int if isinstance(default, int) else float
    return checked(value, key, kind, positive=kind is float or default > 0, where="config.json")


def checked(value: Any, key: str, kind: type, positive: bool, where: str) -> Any:
    """`value` as `kind` (int: an integer, no bool, no float; float: a finite number), > 0 when
    `positive`, else >= 0; ConfigError naming `key` otherwise."""
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}")
    if kind is float and (isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)):
        raise ConfigError(f"{where}: '{key}' must be a finite number, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{where}: '{key}' must be {'positive' if positive else '>= 0'}, got {value!r}")
    return kind(value)


def as_id_tuple(value: Any) -> tuple[int, ...]:
    """A token id or a list of them (integers >= 0) as a tuple; ConfigError for anything else."""
    if value is None:
        return ()
    ids = [value] if not isinstance(value, list | tuple) else list(value)
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ConfigError(f"a token id must be an integer >= 0, got {token!r} (in {value!r})")
    return tuple(ids)


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
    masks, pads = as_id_tuple(mask), as_id_tuple(pad)
    if len(masks) != 1 or len(pads) > 1:
        raise ConfigError(f"{family} checkpoint: mask_token_id and pad_token_id must be one id each")
    return masks[0], tuple(dict.fromkeys(eos + hints.eos_token_ids)), pads[0] if pads else None


def reject_unsupported(config: dict[str, Any], family: str, expectations: dict[str, Any]) -> None:
    """Fail on config switches this engine does not implement, instead of computing something else."""
    for key, accepted in expectations.items():
        value = config.get(key)
        if value is None:
            continue
        ok = value in accepted if isinstance(accepted, tuple) else value == accepted
        if not ok:
            raise ConfigError(f"{family} config.json: '{key}'={value!r} is not supported (supported: {accepted!r})")
