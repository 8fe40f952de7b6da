"""Tensor parallel eager kernels: every rank of a torch.distributed group holds 1/N of each linear
layer's output rows (attention and FFN projections, experts, the LM head's vocabulary), computes
its rows' outputs from the whole input, and all ranks gather the pieces.

Gathering output columns instead of reducing partial sums keeps the arithmetic of one device: each
output element is the same dot product over the whole input, so the result is the one-process
result wherever the device's GEMM gives a column the same bits whatever columns share its call
(measured by the tests on the device that runs them). Activations stay whole on every rank (their
memory is not divided); the weights are.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..models import weight_names
from ..models.quantized import linear
from ..models.spec import ArchSpec
from ..models.weights import ROW_SHARDED_ROLES, Weights, expected_shapes
from .eager import EagerOps
from .sharded import ShardedWeight


def shard_rows(spec: ArchSpec, weights: Weights, rank: int, world: int) -> tuple[Weights, set[int]]:
    """This rank's weights: 1/N of the rows of every linear weight and its bias (experts and the LM
    head too; a tied head gets its own shard), everything else whole; and the ids of the sharded
    weights (what `TensorParallelOps` gathers). A tensor already read as this rank's rows
    (`checkpoint.load(rank_rows=...)`: 1/N of its full rows) is kept as it is."""
    check_rows(spec, world)
    if spec.quantization is not None:
        raise ValueError("tensor parallel weights are not quantized yet: load them unquantized")
    shapes, names = expected_shapes(spec), weight_names(spec)
    sharded: set[int] = set()

    def part(t: Tensor, name: str, weight: bool = True) -> Tensor:
        per = shapes[name][0] // world
        piece = t if t.shape[0] == per else t[rank * per : (rank + 1) * per].clone()
        if weight:
            sharded.add(id(piece))
        return piece

    layers = [
        {
            r: part(t, names.layer[r].format(i=i), not r.endswith("_bias")) if r in ROW_SHARDED_ROLES else t
            for r, t in layer.items()
        }
        for i, layer in enumerate(weights.layers)
    ]
    experts = [
        [{p: part(t, names.expert[p].format(i=i, e=e)) for p, t in expert.items()} for e, expert in enumerate(layer)]
        for i, layer in enumerate(weights.experts)
    ]
    return Weights(weights.embed, weights.final_norm, part(weights.lm_head, names.lm_head), layers, experts), sharded


def gathered(weights: Weights, sharded: set[int], ranks: int, group: dist.ProcessGroup | None = None) -> Weights:
    """`weights` with each sharded weight (ids in `sharded`, from `shard_rows`) standing as the
    whole weight it is a part of (`ShardedWeight`): what the planned kernels multiply by."""

    def whole(t: Tensor) -> Tensor | ShardedWeight:
        return ShardedWeight(t, ranks, group) if id(t) in sharded else t

    layers = [{r: whole(t) for r, t in layer.items()} for layer in weights.layers]
    experts = [[{p: whole(t) for p, t in e.items()} for e in layer] for layer in weights.experts]
    return Weights(weights.embed, weights.final_norm, whole(weights.lm_head), layers, experts)


def check_rows(spec: ArchSpec, world: int) -> None:
    """Every sharded weight's rows split evenly over the ranks."""
    sizes = {"hidden": spec.hidden_size, "q": spec.q_size, "kv": spec.kv_size, "vocabulary": spec.vocab_size}
    if spec.moe is None or not all(spec.moe.moe_layers):
        sizes["ffn"] = spec.intermediate_size
    if spec.moe is not None:
        sizes["experts' ffn"] = spec.moe.expert_intermediate_size
        if spec.moe.shared_expert_intermediate_size:
            sizes["shared expert's ffn"] = spec.moe.shared_expert_intermediate_size
    uneven = {k: v for k, v in sizes.items() if v % world}
    if uneven:
        raise ValueError(f"tensor parallel over {world} ranks needs these sizes to divide evenly: {uneven}")


class TensorParallelOps(EagerOps):
    """`models.ops.Ops` with row-sharded weights: a sharded weight's outputs are gathered from every rank."""

    def __init__(self, sharded: set[int], group: dist.ProcessGroup | None = None):
        self.sharded, self.group = sharded, group
        self.world = dist.get_world_size(group)

    def multiply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """F.linear with this rank's rows (and bias rows, fused as the official call fuses them),
        the other ranks' rows gathered: every eager op that multiplies goes through here."""
        local = linear(x, weight, bias).contiguous()
        if id(weight) not in self.sharded:
            return local
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local, group=self.group)
        return torch.cat(parts, dim=-1)
