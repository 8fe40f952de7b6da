"""One activation arena per device: address space reserved once, memory committed on use, given back on demand.

CPU (`mmap` backing): an anonymous private mapping with MAP_NORESERVE reserves address space
without memory; pages are committed by the kernel when first written; `trim` hands the pages above
a mark back with madvise(MADV_DONTNEED) -- the CPU analogue of mapping and unmapping physical
pages under a CUDA virtual address range. Tensors are views of the mapping (`torch.frombuffer`), and
every view keeps the mapping alive, so no view can outlive it.

CUDA and other devices (`tensor` backing): one device buffer grown in 2 MiB steps (the CUDA
allocator's large-block granularity); `trim` frees it and returns cached blocks to the driver. The
same backing serves fake-tensor prediction, where nothing is allocated at all.

`ArenaMemory` is the `runtime.planned_ops.Memory` that hands out a step plan's buffers as views at
their planned offsets and checks that every request matches the plan.
"""

from __future__ import annotations

import mmap
import os

import torch

from ..planner.step_plan import StepPlan

GROWTH_STEP = 2 << 20


def physical_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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
                size = -(-nbytes // GROWTH_STEP) * GROWTH_STEP
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
            start = -(-keep_bytes // page) * page
            end = min(self.capacity, -(-self.touched_bytes // page) * page)
            if end > start:
                self._map.madvise(mmap.MADV_DONTNEED, start, end - start)
        elif keep_bytes == 0:
            self.base = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
        self.touched_bytes = min(self.touched_bytes, keep_bytes)


class PlanMismatchError(AssertionError):
    """A step asked for a buffer its plan does not have: the trace and the run disagree."""


class ArenaMemory:
    """Hands out a step plan's buffers, allocation by allocation, as views of the arena."""

    tracing = False

    def __init__(self, plan: StepPlan, arena: Arena):
        self.plan, self.arena, self.device = plan, arena, arena.device
        self.allocations = 0
        arena.ensure(plan.arena_bytes)

    def op(self, name: str, *reads: torch.Tensor) -> None:
        pass

    def workspace(self, nbytes: int) -> None:
        pass

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        graph = self.plan.graph
        if self.allocations >= graph.allocations_per_step:
            raise PlanMismatchError(f"allocation {self.allocations} is beyond the plan's {graph.allocations_per_step}")
        index = graph.template_index(self.allocations)
        planned = graph.buffers[index]
        if planned.shape != tuple(shape) or planned.dtype != dtype:
            raise PlanMismatchError(
                f"allocation {self.allocations} asks for {tuple(shape)} {dtype}, the plan has "
                f"{planned.shape} {planned.dtype} (written by {graph.ops[planned.op]})"
            )
        self.allocations += 1
        return self.arena.view(self.plan.offset(index), tuple(shape), dtype)

    def finish(self) -> None:
        if self.allocations != self.plan.graph.allocations_per_step:
            raise PlanMismatchError(
                f"the step made {self.allocations} allocations, its plan {self.plan.graph.allocations_per_step}"
            )
