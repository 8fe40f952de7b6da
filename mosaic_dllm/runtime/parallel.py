"""The eager executor across the ranks of a torch.distributed group (gloo on CPU, NCCL on CUDA;
started by torchrun, `mosaic generate --nproc N`, or `torch.multiprocessing`).

Sequence parallel: each rank holds a shard of the step's tokens (`kernels/sequence_parallel.py`).
Tensor parallel: each rank holds 1/N of every linear layer's rows (`kernels/tensor_parallel.py`;
sharded after loading). Either way every rank gets the step's whole logits, so every rank can run
the same seeded sampler and reach the same tokens: the ranks stay in step without messages beyond
the forward pass's own. The official arithmetic, exact where the device's kernels allow it (tests).
Not built yet: planned (arena) kernels per rank, per-rank plans and budgets, serving.
"""

from __future__ import annotations

import torch.distributed as dist

from ..kernels.sequence_parallel import SequenceParallelOps, check_heads
from ..kernels.tensor_parallel import TensorParallelOps, shard_rows
from ..models.spec import ArchSpec
from ..models.weights import Weights
from .eager import EagerExecutor


def _group_size(group: dist.ProcessGroup | None, kind: str) -> int:
    if not dist.is_initialized():
        raise ValueError(f"{kind} needs torch.distributed initialised (torchrun, --nproc, or init_process_group)")
    return dist.get_world_size(group)


class SequenceParallelExecutor(EagerExecutor):
    name = "sequence-parallel"

    def __init__(self, spec: ArchSpec, weights: Weights, group: dist.ProcessGroup | None = None):
        check_heads(spec.num_heads, spec.num_kv_heads, _group_size(group, "sequence parallel"))
        super().__init__(spec, weights)
        self.ops = SequenceParallelOps(group)


class TensorParallelExecutor(EagerExecutor):
    name = "tensor-parallel"

    def __init__(self, spec: ArchSpec, weights: Weights, group: dist.ProcessGroup | None = None):
        world = _group_size(group, "tensor parallel")
        sharded_weights, sharded = shard_rows(spec, weights, dist.get_rank(group), world)
        super().__init__(spec, sharded_weights)
        self.ops = TensorParallelOps(sharded, group)
