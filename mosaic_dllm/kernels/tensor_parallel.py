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

from ..models.quantized import LINEAR_ROLES, linear
from ..models.spec import ArchSpec
from ..models.weights import Weights
from .eager import EagerOps

# Weights (and the biases of their outputs) split by output rows; routers, norms, embeddings stay whole.
SHARDED_ROLES = (*LINEAR_ROLES, "q_bias", "k_bias", "v_bias")


def shard_rows(spec: ArchSpec, weights: Weights, rank: int, world: int) -> tuple[Weights, set[int]]:
    """This rank's weights: 1/N of the rows of every linear weight and its bias (experts and the LM
    head too; a tied head gets its own shard), everything else whole; and the ids of the sharded
    weights (what `TensorParallelOps` gathers)."""
    check_rows(spec, world)
    if spec.quantization is not None:
        raise ValueError("tensor parallel weights are not quantized yet: load them unquantized")
    sharded: set[int] = set()

    def part(t: Tensor, weight: bool = True) -> Tensor:
        rows = t.shape[0] // world
        piece = t[rank * rows : (rank + 1) * rows].clone()
        if weight:
            sharded.add(id(piece))
        return piece

    layers = [
        {r: part(t, not r.endswith("_bias")) if r in SHARDED_ROLES else t for r, t in layer.items()}
        for layer in weights.layers
    ]
    experts = [[{p: part(t) for p, t in e.items()} for e in layer] for layer in weights.experts]
    return Weights(weights.embed, weights.final_norm, part(weights.lm_head), layers, experts), sharded


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
