"""What a chunk count costs: time of one layer's chunkable ops at a fixed length, by chunk count.

    python benchmarks/chunk_cost.py [--preset llada-8b] [--length 2048] [--repeats 3]

Runs the FFN, the attention norm with the q/k/v projections, the attention block's rotary +
attention and an RMSNorm through `PlannedOps` (the Mosaic executor's ops) with random weights, each
split into 1, 2, 4, ... chunks, and prints the median seconds and the slowdown against one chunk.
The search's minimum chunk size (`planner.search.MIN_CHUNK_TOKENS`) is chosen from this.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from mosaic_dllm.bench.presets import preset
from mosaic_dllm.kernels.planned import AllocatorMemory, PlannedOps
from mosaic_dllm.memory.sizes import ceil_div
from mosaic_dllm.models.groups import PIECE_GROUPS, Chunks


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
    spec = preset(args.preset)
    torch.manual_seed(0)
    h, i, n, hd, length = spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.head_dim, args.length
    x = torch.randn(1, length, h, dtype=torch.bfloat16)
    gate, up = (torch.randn(i, h, dtype=torch.bfloat16) * 0.02 for _ in range(2))
    down = torch.randn(h, i, dtype=torch.bfloat16) * 0.02
    norm_w = torch.ones(h, dtype=torch.bfloat16)
    qkv = [(torch.randn(n * hd, h, dtype=torch.bfloat16) * 0.02, None) for _ in range(3)]
    q = torch.randn(1, n, length, hd, dtype=torch.bfloat16)
    k, v = torch.randn_like(q), torch.randn_like(q)
    ops0 = PlannedOps(AllocatorMemory(torch.device("cpu")))
    cos, sin = ops0.rotary_tables(length, spec.rotary_dim, spec.rope_theta, None, x.device, name="rotary_tables")
    rows = []
    for pieces in [int(p) for p in args.pieces.split(",")]:
        chunks = Chunks(**dict.fromkeys(PIECE_GROUPS, pieces))
        ops = PlannedOps(AllocatorMemory(torch.device("cpu")), chunks)
        row = {"pieces": pieces, "tokens_per_chunk": ceil_div(length, pieces)}
        row["ffn_s"] = timed(lambda: ops.mlp(x, gate, up, down, name="mlp"), args.repeats)  # noqa: B023
        row["qkv_s"] = timed(
            lambda: ops.norm_linears(x, norm_w, 1e-5, qkv, names=("attn_norm", "q_proj", "k_proj", "v_proj")),  # noqa: B023
            args.repeats,
        )
        row["attention_s"] = timed(
            lambda: ops.attention(ops.rotary(q, cos, sin, True, name="rotary_q"), k, v, name="attention"),  # noqa: B023
            args.repeats,
        )
        row["norm_s"] = timed(lambda: ops.rms_norm(x, norm_w, 1e-5, name="ffn_norm"), args.repeats)  # noqa: B023
        rows.append(row)
    base = rows[0]
    print(f"{args.preset} dims, L={length}, bf16, {torch.get_num_threads()} threads; seconds (slowdown vs 1 chunk)")
    print(f"{'pieces':>6} {'tokens':>7} {'ffn':>16} {'norm+qkv':>16} {'rotary+attention':>18} {'rms_norm':>16}")
    for r in rows:
        cells = [f"{r[k]:.3f} ({r[k] / base[k]:.2f}x)" for k in ("ffn_s", "qkv_s", "attention_s", "norm_s")]
        print(
            f"{r['pieces']:>6} {r['tokens_per_chunk']:>7} {cells[0]:>16} {cells[1]:>16} {cells[2]:>18} {cells[3]:>16}"
        )
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
