"""Byte arithmetic in one place: rounding up, sizes as users write them, sizes as people read them."""

from __future__ import annotations

import math
import re

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
UNITS |= {"tb": 10**12, "tib": 2**40}
MiB = 1 << 20
MAX_BYTES = 1 << 60  # an exbibyte: larger sizes are typing accidents, not memory


def ceil_div(n: int, d: int) -> int:
    return -(-n // d)


def align_up(n: int, alignment: int) -> int:
    """n rounded up to a multiple of `alignment`."""
    return ceil_div(n, alignment) * alignment


def parse_bytes(text: str | int, name: str | None = None, minimum: int | None = None) -> int:
    """'2GiB', '512MiB', '4GB', '1e9' or an int -> bytes, at most MAX_BYTES; with `minimum`, a
    smaller size is refused naming the option `name`."""
    if isinstance(text, bool):
        raise ValueError(f"cannot read {text!r} as a size; use e.g. 2GiB, 512MiB, 4GB or a byte count")
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
        try:
            number = float(m.group(1)) if m else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number) or m.group(2).lower() not in UNITS:
            raise ValueError(f"cannot read {text!r} as a size; use e.g. 2GiB, 512MiB, 4GB or a byte count")
        value = number * UNITS[m.group(2).lower()]
    if abs(value) > MAX_BYTES:
        raise ValueError(f"{text!r} is more than {MAX_BYTES >> 60} EiB: not a memory size")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name or 'the size'} must be at least {minimum} bytes, got {text!r}")
    return int(value)


def mib(n: float | None, unit: bool = True) -> str:
    """Bytes as MiB with one decimal ('-' for unknown); `unit=False` for table columns."""
    if n is None:
        return "-"
    return f"{n / MiB:,.1f} MiB" if unit else f"{n / MiB:.1f}"


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"
