"""Search for shapes where attention by query blocks differs from the whole fused call.

    python benchmarks/attention_blocks.py [--threads 2]

Compares, bit for bit, `F.scaled_dot_product_attention` on the whole canvas with the same call on
query blocks: the blocks the attention group uses on this device (the device profile's rule per
dtype) and naive equal thirds, over lengths, head layouts, head dims, batch sizes and dtypes. Prints
the counts; the CI test (tests/kernels/test_attention_blocks.py) runs a subset.
"""

from __future__ import annotations

import argparse
import random

import torch
import torch.nn.functional as F

from mosaic_dllm.device import profile_for
from mosaic_dllm.models.groups import group_spans


def attention(q, k, v):
    gqa = {"enable_gqa": True} if q.shape[1] != k.shape[1] else {}
    return F.scaled_dot_product_attention(q, k, v, **gqa)


def blocked(q, k, v, blocks):
    return torch.cat([attention(q[:, :, s:e], k, v) for s, e in blocks], dim=2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(0)
    counts = {"group blocks": [0, 0], "equal thirds": [0, 0]}
    for length in (1536, 1537, 1600, 1793, 2000, 2304, 2500, 3100):
        for heads, kv_heads, head_dim in ((4, 4, 64), (8, 2, 64), (4, 4, 128), (2, 2, 32), (6, 3, 80), (16, 4, 64)):
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                batch = random.choice([1, 2])
                g = torch.Generator().manual_seed(length + heads)
                q = torch.randn(batch, heads, length, head_dim, generator=g).to(dtype)
                k, v = (torch.randn(batch, kv_heads, length, head_dim, generator=g).to(dtype) for _ in range(2))
                whole = attention(q, k, v)
                group = profile_for("cpu").rules(dtype).group("attention")
                for pieces in (2, 3, 4):
                    blocks = group_spans(length, pieces, group)
                    counts["group blocks"][0] += 1
                    counts["group blocks"][1] += not torch.equal(blocked(q, k, v, blocks), whole)
                size = -(-length // 3)
                thirds = [(s, min(s + size, length)) for s in range(0, length, size)]
                counts["equal thirds"][0] += 1
                counts["equal thirds"][1] += not torch.equal(blocked(q, k, v, thirds), whole)
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    for name, (tried, differ) in counts.items():
        print(f"{name:<13} {tried:>4} splits tried, {differ:>3} differ from the whole call")


if __name__ == "__main__":
    main()
