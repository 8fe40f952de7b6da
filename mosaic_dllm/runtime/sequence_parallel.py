"""The eager executor, sequence parallel: every rank of a torch.distributed group (gloo on CPU,
NCCL on CUDA; started by torchrun or `torch.multiprocessing`) runs the same step on its shard of
the tokens (`kernels/sequence_parallel.py`); every rank gets the step's logits.

This is the first piece of running across devices: the official arithmetic, sharded, exact where
the device profile says it can be (tests). Planned (arena) kernels per rank, sharded weights,
`--nproc` launching and serving are not built yet.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..kernels.sequence_parallel import SequenceParallelOps, check_heads
from ..models import transformer
from ..models.packing import Packing
from ..models.spec import ArchSpec
from ..models.weights import Weights


class SequenceParallelExecutor:
    name = "eager-sequence-parallel"

    def __init__(self, spec: ArchSpec, weights: Weights, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise RuntimeError("sequence parallel needs torch.distributed initialised (torchrun or init_process_group)")
        check_heads(spec.num_heads, spec.num_kv_heads, dist.get_world_size(group))
        self.spec, self.weights, self.group = spec, weights, group

    @torch.inference_mode()
    def logits(self, ids: Tensor) -> Tensor:
        """(B, L) ids, the same on every rank -> (B, L, V) logits for every position, on every rank."""
        b, length = ids.shape
        packing = Packing((length,) * b)
        ops = SequenceParallelOps(packing, self.group)
        hidden = transformer.hidden_states(ops, self.spec, self.weights, ops.local(ids.reshape(1, -1)), packing)
        head = ops.lm_head(hidden, self.weights.lm_head, packing, b, length, name="lm_head")
        return next(head(0, b, None))[1]
