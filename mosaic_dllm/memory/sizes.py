"""Byte arithmetic in one place: rounding up, sizes as users write them, sizes as people read them."""

from __future__ import annotations

import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
MiB = 1 << 20


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def align_up(n: int, alignment: int) -> int:
    """n rounded up to a multiple of `alignment`."""
    return ceil_div(n, alignment) * alignment


def parse_bytes(text: str | int) -> int:
    """'2GiB', '512MiB', '4GB', '1e9' or an int -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    try:
        value = float(m.group(1)) if m else None
    except ValueError:
        value = None
    if value is None or m.group(2).lower() not in UNITS:
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 2GiB, 512MiB, 4GB or a byte count")
    return int(value * UNITS[m.group(2).lower()])


def mib(n: float | None, unit: bool = True) -> str:
    """Bytes as MiB with one decimal ('-' for unknown); `unit=False` for table columns."""
    if n is None:
        return "-"
    return f"{n / MiB:,.1f} MiB" if unit else f"{n / MiB:.1f}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
