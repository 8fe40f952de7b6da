"""The operating system's view of a step's memory: peak resident set size, reset before, read after.

Linux keeps the high-water mark VmHWM; writing 5 to /proc/self/clear_refs resets it to the current
RSS. On CUDA the allocator's own peak statistics play the same role.
"""

from __future__ import annotations

import ctypes
import gc
from pathlib import Path

import torch


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def current_rss_bytes() -> int:
    """The process's resident set size now."""
    return _status_kib("VmRSS") * 1024


def release_free_heap() -> None:
    """Collect garbage and hand freed heap back to the OS, so that the next peak starts clean."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


class PeakMemory:
    """with PeakMemory(device) as pm: step(); pm.growth_bytes: peak during the step minus usage before it."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.growth_bytes = 0

    def __enter__(self) -> PeakMemory:
        release_free_heap()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._before = torch.cuda.memory_reserved(self.device)
        else:
            Path("/proc/self/clear_refs").write_text("5")
            self._before = _status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_reserved(self.device)
        else:
            peak = _status_kib("VmHWM") * 1024
        self.growth_bytes = max(0, peak - self._before)
