"""`mosaic plan`'s text reports: one step plan (what the arena holds, what lives outside it, where
the peak is, how the step is chunked and what recompute costs), the longest request per executor,
and the most requests per batched step."""

from __future__ import annotations

from ..memory.sizes import gib, mib
from .compute import Recompute
from .shapes import StepShape
from .step_plan import StepPlan


def plan_report(
    summary: dict,
    layers: int,
    length: int,
    shape: StepShape,
    plan: StepPlan,
    cost: Recompute,
    search: dict,
    cache: str,
) -> str:
    """The report's lines for `plan` (of step `shape` at total length `length`); `summary` is the
    plan's summary with the model, dtype and device; `search` the budget search's figures, if any."""
    lines = [
        f"{summary['model']} ({layers} layers, {summary['dtype']}, weights {summary['weights']}), "
        f"batch {shape.batch}, L={length}",
        f"  device           {summary['device']}",
        f"  arena            {mib(plan.arena_bytes)} ({plan.plan.algorithm}; lower bound "
        f"{mib(plan.lower_bound_bytes)}, ratio {summary['arena_vs_lower_bound']})",
        f"  workspace        {mib(plan.workspace_bytes)} at most outside the arena at once (attention kernel "
        f"output, quantized kernels' outputs, MoE routing and experts, the "
        f"sampler's {shape.sampler_row_bytes} bytes per logits row at "
        "temperature 0)",
    ]
    if shape.cache_keys and shape.masked_keys:  # block diffusion: the first step runs the prefill
        lines.append(
            f"  largest step     {shape.longest} tokens: a block-causal prefill of {shape.masked_keys} prompt "
            f"positions with the first block (logits for its rows only); block steps attend to at most "
            f"{shape.cache_keys} keys"
        )
    elif shape.masked_keys:  # block diffusion without a cache (LLaDA2.x): every step recomputes
        lines.append(
            f"  largest step     {shape.longest} tokens: the whole canvas, block-causally (the last block's "
            "step; no cache: every step recomputes the prefix, as the official decoding), logits for the "
            "block's rows only"
        )
    if shape.cache_bytes:
        lines.append(f"  block cache      {mib(shape.cache_bytes)} ({cache}), alive across steps outside the arena")
    lines += [
        f"  predicted peak   {mib(plan.predicted_peak_bytes)} of activations (arena + workspace + cache)",
        f"  peak at          {summary['peak_op']} ({summary['peak_group']})",
        f"  chunks           {summary['chunks']}; {summary['planned_layers']}; {summary['buffers']} buffers",
    ]
    if cost.passes > 1:
        lines.append(
            f"  recompute        K and V computed {cost.passes} times per layer (one per query block): "
            f"+{cost.extra_fraction:.1%} multiply-adds; logits within a tolerance of the exact ones"
        )
    else:
        lines.append("  attention        exact (bit-identical to eager)")
    lines.append(f"  planned in       {plan.planning_seconds * 1000:.1f} ms")
    if search:
        lines.append(
            f"  search           fits {mib(search['budget_bytes'])}: {search['plans_tried']} plans tried in "
            f"{search['search_seconds'] * 1000:.1f} ms"
        )
    return "\n".join(lines)


def max_len_report(record: dict) -> str:
    """`mosaic plan --max-len`: the longest request each executor fits into the activation budget."""
    lines = [
        f"{record['model']} ({record['layers']} layers, {record['dtype']}, weights {record['weights']}: "
        f"{gib(record['weight_bytes'])}), activation budget {gib(record['budget_bytes'])} "
        "(predicted from shapes, no weights loaded)"
    ]
    for name, r in record["executors"].items():
        extra = f"  chunks {r['chunks']}" if r.get("chunks") else f"  ({r['note']})" if r.get("note") else ""
        length = "n/a" if r["max_len"] is None else f"{r['max_len']}"
        if r.get("at_search_limit"):
            length = f"at least {length} (nothing failed up to the search's limit)"
        lines.append(f"  {name:<7} max length {length}{extra}")
        for n, per_rank in r.get("ranks", {}).items():
            ratio = (
                f" ({per_rank['vs_ranks_times_one']} of {n} x one process's)"
                if "vs_ranks_times_one" in per_rank
                else ""
            )
            lines.append(
                f"    sequence parallel over {n} ranks (the budget each): max length {per_rank['max_len']}{ratio}"
                f"  chunks {per_rank.get('chunks', '-')}"
            )
    if "mosaic_vs_eager" in record:
        lines.append(f"  mosaic / eager: {record['mosaic_vs_eager']}x")
    if max((r["max_len"] or 0) for r in record["executors"].values()) > record["context"]:
        lines.append(
            f"  the model's context is {record['context']} tokens: longer requests are refused unless "
            "allowed (--allow-long-context; quality may degrade)"
        )
    return "\n".join(lines)


def max_batch_report(record: dict) -> str:
    """`mosaic plan --max-batch`: the most requests like this one a batched step fits."""
    head = f"{record['model']} ({record['dtype']}), L={record['length']}, budget {mib(record['budget_bytes'])}"
    lines = [f"{head}: at most {record['max_batch']} requests per step"]
    if record["max_batch"]:
        lines.append(f"  predicted peak {mib(record['predicted_peak_activation_bytes'])}, chunks {record['chunks']}")
    return "\n".join(lines)
