"""Where planned ops take their buffers: the `Memory` protocol (an arena when running, meta tensors
when tracing, `plan/trace.py` and `runtime/mosaic.py`) and `AllocatorMemory`, the same ops unplanned."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from ..device import KernelRules
from ..models.groups import OpGroup


class Memory(Protocol):
    device: torch.device  # where its buffers live (meta when tracing)
    rules: KernelRules  # the device the step runs on, for the step's dtype: call sizes, blocks, workspace
    tracing: bool  # True: meta tensors, nothing computed; data-dependent work is skipped

    def op(self, name: str, group: str, *reads: Tensor) -> None:
        """An op named `name`, of op group `group`, starts and reads `reads`."""

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised buffer written by the current op."""

    def workspace(self, nbytes: int) -> None:
        """The current op's kernel allocates `nbytes` outside the arena, freed when the op ends."""

    def chunk_size(self, totals: tuple[int, ...], group: OpGroup, pieces: int) -> int:
        """Tracing only: rows in the largest chunk when each of `totals` rows (all tokens, or
        each sequence's queries) is split into `pieces` chunks of op group `group`."""


class AllocatorMemory:
    """A `Memory` that takes every buffer from the PyTorch allocator: the same ops, unplanned.

    Used to measure what the arena plan itself is worth (mask-only logits without a global plan).
    """

    tracing = False

    def __init__(self, rules: KernelRules):
        self.rules, self.device = rules, rules.device

    def op(self, name: str, group: str, *reads: Tensor) -> None:
        pass

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def workspace(self, nbytes: int) -> None:
        pass
