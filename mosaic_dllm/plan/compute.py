"""What a step's chunking costs in arithmetic: the multiply-adds recomputation adds to a step.

The exact chunkings only reorder work; recomputing keys and values (the "recompute" group) projects
every key chunk once per query block, so `mosaic plan` and the benchmarks state the extra compute
next to the memory it saves.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..models.groups import BY_NAME, group_spans
from ..models.spec import ArchSpec
from .shapes import StepShape


@dataclass(frozen=True)
class Recompute:
    passes: int  # times the longest sequence's K and V are computed per layer (1: exact)
    extra_fraction: float  # multiply-adds added, as a fraction of the exact step's body


def step_macs(spec: ArchSpec, shape: StepShape) -> int:
    """Multiply-adds of a step's layers (projections, attention, FFN or MoE; not the LM head)."""
    h, q_width, kv_width = spec.hidden_size, spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    total = 0
    for i in range(spec.num_layers):
        if spec.is_moe_layer(i):
            moe = spec.moe
            ffn = moe.experts_per_token * 3 * h * moe.expert_intermediate_size + h * moe.num_experts
            ffn += 3 * h * moe.shared_expert_intermediate_size
        else:
            ffn = 3 * h * spec.intermediate_size
        per_token = h * (2 * q_width + 2 * kv_width) + ffn
        total += shape.tokens * per_token + sum(2 * n * n * q_width for n in shape.lengths)
    return total


def recompute_cost(spec: ArchSpec, shape: StepShape) -> Recompute:
    """How often the step computes K and V per layer and what that adds (none when not recomputing)."""
    pieces = shape.chunks.recompute
    if pieces == 1:
        return Recompute(1, 0.0)
    group = BY_NAME["recompute"]
    blocks = [len(group_spans(n, pieces, group)) for n in shape.lengths]
    kv_width = spec.num_kv_heads * spec.head_dim
    extra = spec.num_layers * sum(
        (b - 1) * n * 2 * spec.hidden_size * kv_width for b, n in zip(blocks, shape.lengths, strict=True)
    )
    return Recompute(max(blocks), extra / step_macs(spec, shape))
