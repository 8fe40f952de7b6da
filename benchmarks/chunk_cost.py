"""What a chunk count costs: time of one layer's chunkable ops at a fixed length, by chunk count.

    python benchmarks/chunk_cost.py [--preset llada-8b] [--length 2048] [--repeats 3]

Runs the FFN, the attention norm with the q/k/v projections, the whole attention block (one
chunk: op by op; more: the attention region in query blocks of at least 768 queries, the smallest
the search may pick) and an RMSNorm through `PlannedOps` (the Mosaic executor's ops) with random
weights, each split into 1, 2, 4, ... chunks, and prints the median seconds and the slowdown
against one chunk. The search's minimum chunk size (`plan.search.MIN_CHUNK_TOKENS`) is chosen from this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mosaic_dllm.bench.presets import preset
from mosaic_dllm.bench.step import random_weights
from mosaic_dllm.device import profile_for
from mosaic_dllm.kernels.planned import AllocatorMemory, PlannedOps
from mosaic_dllm.memory.sizes import ceil_div
from mosaic_dllm.models import transformer
from mosaic_dllm.models.groups import PIECE_GROUPS, Chunks
from mosaic_dllm.models.packing import Packing


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llada-8b")
    parser.add_argument("--length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pieces", default="1,2,4,8,16,32,64")
    args = parser.parse_args()
    spec = preset(args.preset, 1)
    torch.manual_seed(0)
    h, length = spec.hidden_size, args.length
    weights = random_weights(spec, torch.bfloat16)
    layer = weights.layers[0]
    x = torch.randn(1, length, h, dtype=torch.bfloat16)
    gate, up, down = layer["gate"], layer["up"], layer["down"]
    norm_w = layer["attn_norm"]
    qkv = [(layer[p], layer.get(f"{p}_bias")) for p in ("q", "k", "v")]
    packing = Packing((length,))
    rules = profile_for("cpu").rules(torch.bfloat16)
    ops0 = PlannedOps(AllocatorMemory(rules))
    cos, sin = ops0.rotary_tables(length, spec.rotary_dim, spec.rope_theta, None, x.device, name="rotary_tables")
    rows = []
    for pieces in [int(p) for p in args.pieces.split(",")]:
        chunks = Chunks(**dict.fromkeys(PIECE_GROUPS, pieces))
        ops = PlannedOps(AllocatorMemory(rules), chunks)
        row = {"pieces": pieces, "tokens_per_chunk": ceil_div(length, pieces)}
        row["ffn_s"] = timed(lambda: ops.mlp(x, gate, up, down, name="mlp"), args.repeats)  # noqa: B023
        row["qkv_s"] = timed(
            lambda: ops.norm_linears(x, norm_w, 1e-5, qkv, names=("attn_norm", "q_proj", "k_proj", "v_proj")),  # noqa: B023
            args.repeats,
        )
        block_ops = PlannedOps(AllocatorMemory(rules), Chunks(attention=pieces))
        row["attention_s"] = timed(
            lambda: transformer.attention_block(block_ops, spec, layer, 0, x.clone(), cos, sin, packing),  # noqa: B023
            args.repeats,
        )
        row["norm_s"] = timed(lambda: ops.rms_norm(x, norm_w, 1e-5, name="ffn_norm"), args.repeats)  # noqa: B023
        rows.append(row)
    base = rows[0]
    print(f"{args.preset} dims, L={length}, bf16, {torch.get_num_threads()} threads; seconds (slowdown vs 1 chunk)")
    print(f"{'pieces':>6} {'tokens':>7} {'ffn':>16} {'norm+qkv':>16} {'attention block':>18} {'rms_norm':>16}")
    for r in rows:
        cells = [f"{r[k]:.3f} ({r[k] / base[k]:.2f}x)" for k in ("ffn_s", "qkv_s", "attention_s", "norm_s")]
        print(
            f"{r['pieces']:>6} {r['tokens_per_chunk']:>7} {cells[0]:>16} {cells[1]:>16} {cells[2]:>18} {cells[3]:>16}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
