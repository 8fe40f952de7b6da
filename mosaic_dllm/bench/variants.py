"""Executor variants the benchmarks compare: the eager baseline, then Mosaic's techniques one at a time.

    eager              official: full logits, the PyTorch allocator
    mask-only          + logits only for the rows the sampler reads (same ops, buffers from the allocator)
    planned            + every activation at its offset in one arena (global plan), nothing chunked
    chunk-ffn-logits   + the search may chunk the FFN/MoE and the logits rows (what the Mosaic release can)
    mosaic             + it may also chunk norms, rotary and attention (query blocks): the exact floor
    mosaic-recompute   + below that floor, K and V recomputed per query block (opt-in; not bit-exact)

With a budget (max-len), the planned variants search for chunks that fit it.
"""

from __future__ import annotations

from ..models.groups import searchable_groups

VARIANTS: dict[str, tuple[str, dict]] = {
    "eager": ("eager", {}),
    "mask-only": ("mosaic", {"activations": "allocator", "chunk_groups": []}),
    "planned": ("mosaic", {"chunk_groups": []}),
    "chunk-ffn-logits": ("mosaic", {"chunk_groups": ["ffn", "logits"]}),
    "mosaic": ("mosaic", {}),
    "mosaic-recompute": ("mosaic", {"chunk_groups": list(searchable_groups(True))}),  # every group, recompute too
}


def variant_options(names: list[str], row_chunk: int, budget: int | None = None) -> dict[str, dict]:
    """variant -> worker options: {"kind": executor name, **executor options}."""
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        raise ValueError(f"unknown executors {unknown}; available: {', '.join(VARIANTS)}")
    out = {}
    for name in names:
        kind, options = VARIANTS[name]
        options = dict(options)
        if kind == "mosaic":
            options["row_chunk"] = row_chunk
            if budget is not None and options.get("activations") != "allocator":
                options["memory_budget"] = budget
        out[name] = {"kind": kind} | options
    return out
