"""Memory sizes as users write them, and the default activation budget of a device."""

from __future__ import annotations

import re
from pathlib import Path

import torch

UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
DEFAULT_RESERVE = 1 << 30


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


def available_bytes(device: torch.device | str) -> int:
    """What the device has free now: the kernel's MemAvailable on CPU, the driver's free memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable: give the memory budget explicitly")


def default_budget(device: torch.device | str, reserve: int = DEFAULT_RESERVE) -> int:
    """Free memory now (after the weights are loaded) minus `reserve` for everything else."""
    budget = available_bytes(device) - reserve
    if budget <= 0:
        raise ValueError(
            f"no memory left for activations: {available_bytes(device) / 2**20:.0f} MiB free, "
            f"reserve {reserve / 2**20:.0f} MiB; lower the reserve or give a memory budget"
        )
    return budget
