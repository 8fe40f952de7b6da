"""Live-tensor accounting with a TorchDispatchMode: exact activation bytes, op by op.

Every storage created by an op while the tracker is active is counted until it is freed (a
weakref finalizer on the untyped storage). Outputs that alias an input (views, in-place and
out= ops) add nothing. Tensors that existed before the step (weights, the canvas) are never
counted. This measures what the step allocates, independent of the allocator; `rss.py` gives
the operating system's view, fragmentation included.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass
class OpRecord:
    op: str  # aten op name
    live_bytes: int  # live activation bytes after the op
    new_bytes: int  # bytes the op allocated
    shape: tuple[int, ...]  # shape of its first output


@dataclass
class Timeline:
    records: list[OpRecord] = field(default_factory=list)
    # Bytes held for the whole step outside aten allocations: a planned arena mapped by the
    # executor (its views add nothing to `records`). Included in every figure below.
    planned_bytes: int = 0

    @property
    def peak(self) -> int:
        return self.planned_bytes + max((r.live_bytes for r in self.records), default=0)

    @property
    def average(self) -> float:
        if not self.records:
            return float(self.planned_bytes)
        return self.planned_bytes + sum(r.live_bytes for r in self.records) / len(self.records)

    @property
    def par(self) -> float:
        """Peak-to-average ratio of live activation bytes over the step's ops."""
        return self.peak / self.average if self.average else 0.0

    def split(self, vocab_size: int) -> tuple[int, int]:
        """(peak before the first op producing vocabulary-wide rows, peak from there on).

        The first tensor whose last dimension is the vocabulary starts the logits/sampling phase.
        """
        start = next((i for i, r in enumerate(self.records) if r.shape and r.shape[-1] == vocab_size), None)
        if start is None:
            return self.peak, 0
        body = max((r.live_bytes for r in self.records[:start]), default=0)
        return self.planned_bytes + body, self.planned_bytes + max(r.live_bytes for r in self.records[start:])


def _storages(tree) -> list[torch.UntypedStorage]:
    leaves, _ = tree_flatten(tree)
    return [t.untyped_storage() for t in leaves if isinstance(t, torch.Tensor) and t.device.type != "meta"]


class LiveTensorTracker(TorchDispatchMode):
    """with LiveTensorTracker() as tracker: step(); tracker.timeline.peak"""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.timeline = Timeline()
        self._sizes: dict[int, int] = {}

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if tensors and all(t.device.type == "meta" for t in tensors):
            return out  # a planner tracing shapes on the meta device: no memory, not part of the timeline
        inputs = {s._cdata for s in _storages((args, kwargs))}
        new = 0
        for storage in _storages(out):
            key = storage._cdata  # the StorageImpl: unique while alive, also for fake tensors
            if key in inputs or key in self._sizes or storage.nbytes() == 0:
                continue
            self._sizes[key] = storage.nbytes()
            new += storage.nbytes()
            weakref.finalize(storage, self._free, key)
        self.live += new
        shape = tuple(tensors[0].shape) if tensors else ()
        self.timeline.records.append(OpRecord(str(func.overloadpacket.__name__), self.live, new, shape))
        return out
