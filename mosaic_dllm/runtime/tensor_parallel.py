"""The eager executor, tensor parallel: every rank of a torch.distributed group holds 1/N of each
linear layer's rows (`kernels/tensor_parallel.py`) and gathers the others' outputs; every rank gets
the step's logits. The weights are sharded after loading (a loader reading only a rank's rows, and
sharded quantized weights, are not built yet).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.tensor_parallel import TensorParallelOps, shard_rows
from ..models import transformer
from ..models.spec import ArchSpec
from ..models.weights import Weights


class TensorParallelExecutor:
    name = "eager-tensor-parallel"

    def __init__(self, spec: ArchSpec, weights: Weights, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise RuntimeError("tensor parallel needs torch.distributed initialised (torchrun or init_process_group)")
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        self.spec = spec
        self.weights, sharded = shard_rows(spec, weights, rank, world)
        self.ops = TensorParallelOps(sharded, group)

    @torch.inference_mode()
    def logits(self, ids: Tensor) -> Tensor:
        """(B, L) ids, the same on every rank -> (B, L, V) logits for every position, on every rank."""
        return next(transformer.logits(self.ops, self.spec, self.weights, ids))[1]
