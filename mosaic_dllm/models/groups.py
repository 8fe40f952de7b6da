"""The op groups of a denoising step: the one table that the description, the kernels, the trace
and the chunking search all read.

Every `Ops` method belongs to one group. A group that may be chunked says what a chunk splits:
"tokens" (every packed token of the step), "queries" (each sequence's query positions,
attended against all its keys) or "rows" (the logits rows a sampler reads); and its smallest chunk.
The trace labels every op with its group, the plan reports the group at the peak, and the search
splits that group's chunk. Adding a chunkable region = one row here + its kernel in
`kernels/planned.py`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, make_dataclass

from ..memory.sizes import ceil_div

# Below this many tokens per chunk a GEMM's per-call overhead dominates (benchmarks/README.md has
# the measured cost).
MIN_CHUNK_TOKENS = 32
# Which query blocks keep the fused attention kernel's per-row arithmetic is a fact of the device
# (PyTorch's CPU flash attention picks its query split and AMX packing by the query count): the
# attention row below is a placeholder that `device.KernelRules.group` replaces with the blocks the
# device profile measured; nothing chunks attention without asking it.
# Recomputing K and V per query block costs a K/V projection of the whole sequence per block:
# blocks below a wide GEMM's row tile would multiply that cost for little memory.
RECOMPUTE_MIN_QUERIES = 256


@dataclass(frozen=True)
class OpGroup:
    name: str
    methods: tuple[str, ...]  # the `models.ops.Ops` methods whose work belongs to this group
    splits: str | None  # "tokens" | "queries" | "rows" | None (never chunked)
    min_chunk: int = 1  # the search splits no further
    align: int = 1  # chunks start at multiples of this
    min_block: int = 1  # no chunk (a short last one included) is smaller: merged into the one before
    exact: bool = True  # False: results within a stated tolerance of eager's, used only when allowed


GROUPS = (
    OpGroup("embedding", ("embed", "rotary_tables"), None),
    OpGroup("norms", ("rms_norm",), "tokens", MIN_CHUNK_TOKENS),
    OpGroup("projections", ("linear", "norm_linears", "linear_add"), "tokens", MIN_CHUNK_TOKENS),
    OpGroup("rotary", ("rotary",), "tokens", MIN_CHUNK_TOKENS),  # elementwise: exact at any split
    OpGroup(
        "attention",
        ("attention", "attention_region"),  # chunked: the whole attention block in query blocks
        "queries",
        MIN_CHUNK_TOKENS,  # the device's blocks: KernelRules.group("attention")
    ),
    # Below the exact floor (opt-in): the attention region keeps no full K and V; each query block
    # streams over key chunks (the same blocks) whose K and V it computes again from the residual
    # stream, merging their softmaxes by log-sum-exp. Chunked, it replaces the attention group's region.
    OpGroup(
        "recompute",
        ("attention_recompute",),
        "queries",
        RECOMPUTE_MIN_QUERIES,
        min_block=RECOMPUTE_MIN_QUERIES,
        exact=False,
    ),
    OpGroup("ffn", ("mlp", "moe", "norm_mlp_add"), "tokens", MIN_CHUNK_TOKENS),
    OpGroup("residual", ("add",), None),
    OpGroup("logits", ("lm_head",), "rows", 1),
)
BY_NAME = {g.name: g for g in GROUPS}
GROUP_OF_METHOD = {m: g for g in GROUPS for m in g.methods}
CHUNKABLE_GROUPS = tuple(g.name for g in GROUPS if g.splits is not None)
# What the search splits by default: groups whose every chunking is bit-identical to eager.
EXACT_GROUPS = tuple(name for name in CHUNKABLE_GROUPS if BY_NAME[name].exact)


def searchable_groups(allow_recompute: bool, groups: tuple[str, ...] | None = None) -> tuple[str, ...] | None:
    """The groups a search may split: `groups` (None: the executor's default, the exact ones), plus
    recompute when allowed (every chunkable group when none are named)."""
    if not allow_recompute:
        return groups
    return CHUNKABLE_GROUPS if groups is None else (*dict.fromkeys((*groups, "recompute")),)


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


def spans(total: int, pieces: int, align: int = 1, min_block: int = 1) -> list[tuple[int, int]]:
    """[start, end) of about `pieces` near-equal consecutive chunks of `total` (fewer if total is
    small): chunk sizes rounded down to a multiple of `align`, none shorter than `min_block` (a
    short tail joins the chunk before it)."""
    size = max(min_block, ceil_div(total, max(1, pieces)) // align * align, 1)
    starts = list(range(0, total, size))
    if len(starts) > 1 and total - starts[-1] < min_block:
        starts.pop()
    return [(s, e) for s, e in zip(starts, [*starts[1:], total], strict=True)]


def group_spans(total: int, pieces: int, group: OpGroup) -> list[tuple[int, int]]:
    """The chunks `group` runs `total` rows in when split into `pieces`."""
    return spans(total, pieces, group.align, group.min_block)


def largest_chunk(total: int, pieces: int, group: OpGroup) -> int:
    """Rows in the largest chunk (the first, or a last one a short tail joined): what every
    chunk-sized buffer of the group holds."""
    return max(end - start for start, end in group_spans(total, pieces, group))
