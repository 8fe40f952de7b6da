"""One activation arena per device: address space reserved once, memory committed on use, given back on demand.

CPU (`mmap` backing): an anonymous private mapping with MAP_NORESERVE reserves address space
without memory; pages are committed by the kernel when first written; `trim` hands the pages above
a mark back with madvise(MADV_DONTNEED) -- the CPU analogue of mapping and unmapping physical
pages under a CUDA virtual address range. Tensors are views of the mapping (`torch.frombuffer`), and
every view keeps the mapping alive, so no view can outlive it.

CUDA and other devices (`tensor` backing): one device buffer grown in 2 MiB steps (the CUDA
allocator's large-block granularity); `trim` frees it and returns cached blocks to the driver. The
same backing serves fake-tensor prediction, where nothing is allocated at all.

The arena knows bytes only: it is asked for a size and hands out views at offsets. Which buffer
lives at which offset is the step plan's business (`runtime/mosaic.py`).
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import os

import torch

from .sizes import align_up

GROWTH_STEP = 2 << 20


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@functools.cache
def map_large_allocations() -> None:
    """Make the C allocator map every allocation of 1 MiB or more and unmap it on free.

    What kernels allocate outside the arena (the attention kernel's outputs and its copy of K
    and V, declared as plan workspace) is freed op by op, but glibc's dynamic mmap threshold
    rises with the first large free, after which such buffers come from its heap and freed ones
    stay resident: measured, a recomputing step at 16,384 tokens grew RSS 22 MiB past its plan.
    A fixed threshold keeps RSS at what is live. Process-wide, once; a no-op off glibc.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


class ArenaError(RuntimeError):
    """The arena cannot provide what a plan needs."""


class Arena:
    def __init__(
        self, device: torch.device | str = "cpu", backing: str | None = None, reserve_bytes: int | None = None
    ):
        self.device = torch.device(device)
        self.backing = backing or ("mmap" if self.device.type == "cpu" else "tensor")
        if self.backing not in ("mmap", "tensor"):
            raise ValueError(f"arena backing must be 'mmap' or 'tensor', got {self.backing!r}")
        if self.backing == "mmap" and self.device.type != "cpu":
            raise ValueError("the mmap arena backs CPU tensors only")
        self.reserve_bytes = reserve_bytes or (physical_memory_bytes() if self.backing == "mmap" else 0)
        if self.backing == "mmap":
            map_large_allocations()
        self._map: mmap.mmap | None = None
        self.base: torch.Tensor | None = None
        self.touched_bytes = 0  # high-water mark of the bytes handed out since the last trim

    @property
    def capacity(self) -> int:
        return 0 if self.base is None else self.base.numel()

    def ensure(self, nbytes: int) -> None:
        """Make [0, nbytes) usable. Views handed out earlier stay valid unless the arena must move."""
        if nbytes > self.capacity:
            if self.backing == "mmap":
                self._map_cpu(max(nbytes, self.reserve_bytes))
            else:
                self.base = None
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                size = align_up(nbytes, GROWTH_STEP)
                self.base = torch.empty(size, dtype=torch.uint8, device=self.device)
        self.touched_bytes = max(self.touched_bytes, nbytes)

    def _map_cpu(self, nbytes: int) -> None:
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_NORESERVE", 0)
        try:
            mapping = mmap.mmap(-1, nbytes, flags=flags, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError as exc:
            raise ArenaError(f"cannot reserve {nbytes} bytes of address space for the arena: {exc}") from exc
        self.base = None  # views of an older mapping keep it alive until they are gone
        self._map = mapping
        self.base = torch.frombuffer(mapping, dtype=torch.uint8)
        self.reserve_bytes = nbytes

    def view(self, offset: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        if offset % dtype.itemsize or offset + nbytes > self.capacity:
            raise ArenaError(f"view of {nbytes} bytes at {offset} does not fit an arena of {self.capacity} bytes")
        return self.base[offset : offset + nbytes].view(dtype).view(shape)

    def trim(self, keep_bytes: int = 0) -> None:
        """Give the memory above `keep_bytes` back to the system; its contents are lost."""
        if self.base is None:
            return
        if self.backing == "mmap":
            page = mmap.PAGESIZE
            start = align_up(keep_bytes, page)
            end = min(self.capacity, align_up(self.touched_bytes, page))
            if end > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        elif keep_bytes == 0:
            self.base = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.touched_bytes = min(self.touched_bytes, keep_bytes)
