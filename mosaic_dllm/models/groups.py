"""The op groups of a denoising step: the one table that the description, the kernels, the trace
and the chunking search all read.

Every `Ops` method belongs to one group. A group that may be chunked says what a chunk splits:
"tokens" (the rows of every sequence of the batch), "queries" (each sequence's query positions,
attended against all its keys) or "rows" (the logits rows a sampler reads); and its smallest chunk.
The trace labels every op with its group, the plan reports the group at the peak, and the search
splits that group's chunk. Adding a chunkable region = one row here + its kernel in
`kernels/planned.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, make_dataclass

from ..memory.sizes import ceil_div

# Below this many tokens (query rows for attention) per chunk a GEMM's per-call overhead dominates
# (benchmarks/README.md has the measured cost).
MIN_CHUNK_TOKENS = 32


@dataclass(frozen=True)
class OpGroup:
    name: str
    methods: tuple[str, ...]  # the `models.ops.Ops` methods whose work belongs to this group
    splits: str | None  # "tokens" | "queries" | "rows" | None (never chunked)
    min_chunk: int = 1


GROUPS = (
    OpGroup("embedding", ("embed", "rotary_tables"), None),
    OpGroup("norms", ("rms_norm",), "tokens", MIN_CHUNK_TOKENS),
    OpGroup("projections", ("linear", "norm_linears", "linear_add"), "tokens", MIN_CHUNK_TOKENS),
    OpGroup("attention", ("rotary", "attention"), "queries", MIN_CHUNK_TOKENS),
    OpGroup("ffn", ("mlp", "moe", "norm_mlp_add"), "tokens", MIN_CHUNK_TOKENS),
    OpGroup("residual", ("add",), None),
    OpGroup("logits", ("lm_head",), "rows", 1),
)
BY_NAME = {g.name: g for g in GROUPS}
GROUP_OF_METHOD = {m: g for g in GROUPS for m in g.methods}
CHUNKABLE_GROUPS = tuple(g.name for g in GROUPS if g.splits is not None)
# Groups chunked into a number of pieces; the logits group is chunked by rows per chunk instead.
PIECE_GROUPS = tuple(g.name for g in GROUPS if g.splits in ("tokens", "queries"))


def _as_dict(self) -> dict[str, int]:
    return {f.name: getattr(self, f.name) for f in fields(self)}


# How many pieces each piece-chunked group runs in (1: whole): part of a step's plan key.
Chunks = make_dataclass(
    "Chunks", [(name, int, 1) for name in PIECE_GROUPS], frozen=True, namespace={"as_dict": _as_dict}
)
Chunks.__module__ = __name__
Chunks.__doc__ = f"Pieces per chunkable group ({', '.join(PIECE_GROUPS)}); 1 runs the group whole."


def spans(total: int, pieces: int) -> list[tuple[int, int]]:
    """[start, end) of `pieces` near-equal consecutive chunks of `total` (fewer if total is small)."""
    size = ceil_div(total, max(1, pieces))
    return [(s, min(s + size, total)) for s in range(0, total, size)]
