"""Executors across the ranks of a torch.distributed group (gloo on CPU, NCCL on CUDA; started by
torchrun, `mosaic generate --nproc N`, or `torch.multiprocessing`).

Sequence parallel: each rank holds a shard of the step's tokens (`kernels/sequence_parallel.py`).
Tensor parallel: each rank holds 1/N of every linear layer's rows (`kernels/sharded.py`,
`kernels/tensor_parallel.py`; read per rank from the checkpoint). Each planned per rank like the
Mosaic executor (`sequence-parallel`, `tensor-parallel`) or run eagerly (`-eager`, the oracles).
Every rank reads every logits row the sampler reads, so every rank runs the same seeded sampler
and reaches the same tokens: the ranks stay in step without messages beyond the forward pass's
own (serving: `lead.py`). The official arithmetic, exact where the device's kernels allow it.
"""

from __future__ import annotations

import torch.distributed as dist

from ..kernels.memory import AllocatorMemory
from ..kernels.planned import PlannedOps
from ..kernels.sequence_parallel import PlannedSequenceParallelOps, SequenceParallelOps, check_heads
from ..kernels.tensor_parallel import TensorParallelOps, gathered, shard_rows
from ..models.groups import Chunks
from ..models.spec import ArchSpec
from ..models.weights import Weights
from .eager import EagerExecutor
from .executor import ExecutorOptions
from .mosaic import ArenaMemory, MosaicExecutor


def _group_size(group: dist.ProcessGroup | None, kind: str) -> int:
    if not dist.is_initialized():
        raise ValueError(f"{kind} needs torch.distributed initialised (torchrun, --nproc, or init_process_group)")
    return dist.get_world_size(group)


class SequenceParallelExecutor(MosaicExecutor):
    """The Mosaic executor on a shard of every step's tokens: each rank plans its part of the step
    (`StepShape.ranks`) in its own budget; the ranks plan alike, so a step that does not fit is
    refused on every rank before any collective starts."""

    name = "sequence-parallel"

    def __init__(
        self,
        spec: ArchSpec,
        weights: Weights,
        options: ExecutorOptions | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        self.ranks = _group_size(group, "sequence parallel")
        check_heads(spec.num_heads, spec.num_kv_heads, self.ranks)
        super().__init__(spec, weights, options)
        self.group, self.rank = group, dist.get_rank(group)

    def planned_ops(self, memory: ArenaMemory | AllocatorMemory, chunks: Chunks) -> PlannedOps:
        if self.ranks == 1:  # a group of one: the one-process step (its plan is traced so)
            return super().planned_ops(memory, chunks)
        return PlannedSequenceParallelOps(memory, chunks, self.ranks, self.rank, self.group)


class EagerSequenceParallelExecutor(EagerExecutor):
    """Sequence parallel with the eager kernels: the official arithmetic across ranks (the oracle)."""

    name = "sequence-parallel-eager"

    def __init__(self, spec: ArchSpec, weights: Weights, group: dist.ProcessGroup | None = None):
        check_heads(spec.num_heads, spec.num_kv_heads, _group_size(group, "sequence parallel"))
        super().__init__(spec, weights)
        self.ops = SequenceParallelOps(group)


class TensorParallelExecutor(MosaicExecutor):
    """The Mosaic executor with 1/N of every linear weight's rows on each rank (products gather the
    other ranks' columns: `kernels/sharded.py`): weights divided, activations whole; each rank's
    step planned in its own budget (`StepShape.tensor_ranks`)."""

    name = "tensor-parallel"

    def __init__(
        self,
        spec: ArchSpec,
        weights: Weights,
        options: ExecutorOptions | None = None,
        group: dist.ProcessGroup | None = None,
    ):
        self.tensor_ranks = _group_size(group, "tensor parallel")
        if self.tensor_ranks > 1:  # a group of one keeps the whole weights: the one-process step
            local, sharded = shard_rows(spec, weights, dist.get_rank(group), self.tensor_ranks)
            weights = gathered(local, sharded, self.tensor_ranks, group)
        super().__init__(spec, weights, options)


class EagerTensorParallelExecutor(EagerExecutor):
    """Tensor parallel with the eager kernels: the official arithmetic across ranks."""

    name = "tensor-parallel-eager"

    def __init__(self, spec: ArchSpec, weights: Weights, group: dist.ProcessGroup | None = None):
        world = _group_size(group, "tensor parallel")
        sharded_weights, sharded = shard_rows(spec, weights, dist.get_rank(group), world)
        super().__init__(spec, sharded_weights)
        self.ops = TensorParallelOps(sharded, group)
