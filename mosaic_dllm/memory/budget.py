"""The default activation budget of a device: what it has free after the weights, minus a reserve."""

from __future__ import annotations

from pathlib import Path

import torch

from .sizes import mib

DEFAULT_RESERVE = 1 << 30


def available_bytes(device: torch.device | str) -> int:
    """What the device has free now: the kernel's MemAvailable on CPU, the driver's free memory on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/meminfo has no MemAvailable: give the memory budget explicitly")


def default_budget(device: torch.device | str, reserve: int = DEFAULT_RESERVE, sharers: int = 1) -> int:
    """Free memory now (after the weights are loaded), a `sharers`-th of it where several processes
    share the device (sequence-parallel ranks on one machine), minus `reserve` for everything else."""
    budget = available_bytes(device) // sharers - reserve
    if budget <= 0:
        raise ValueError(
            f"no memory left for activations: {mib(available_bytes(device))} free, "
            f"reserve {mib(reserve)}; lower the reserve or give a memory budget"
        )
    return budget
