"""Sequence and tensor parallel eager steps vs one process, on this machine (#31, first piece).

    python benchmarks/parallel.py --lengths 1024,2048 --out benchmarks/results/parallel.json

llada-8b dims, `--layers` layers, random bf16 weights (each rank makes the same ones from a seed).
One process with 2 threads runs the eager step (every position's logits, as the official forward);
2 processes with 1 thread each run it sequence parallel and tensor parallel over gloo. Per run:
the step's time (best of 2 after a warm-up), each rank's peak RSS growth over the step (VmHWM),
and the bytes each rank sends through the collectives per step (counted at the collective calls).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mosaic_dllm.bench.presets import preset  # noqa: E402
from mosaic_dllm.memory.rss import PeakMemory  # noqa: E402
from mosaic_dllm.models.weights import from_state_dict, random_state_dict  # noqa: E402
from mosaic_dllm.runtime import EagerExecutor, SequenceParallelExecutor, TensorParallelExecutor  # noqa: E402

SENT = {"bytes": 0}


def counted(collective):
    """A collective that adds what this rank sends to SENT (a peer's share of its inputs)."""

    def call(outputs, inputs, *args, **kwargs):
        world = dist.get_world_size()
        if isinstance(inputs, list):  # all_to_all: every part but this rank's own goes out
            SENT["bytes"] += sum(t.nbytes for i, t in enumerate(inputs) if i != dist.get_rank())
        else:  # all_gather: this rank's tensor goes to every other rank
            SENT["bytes"] += inputs.nbytes * (world - 1)
        return collective(outputs, inputs, *args, **kwargs)

    return call


def step(executor, length: int) -> dict:
    ids = torch.randint(0, 100000, (1, length), generator=torch.Generator().manual_seed(1))
    executor.logits(ids)  # warm-up
    times, growth = [], 0
    for _ in range(2):
        SENT["bytes"] = 0
        with PeakMemory(torch.device("cpu")) as peak:
            begin = time.perf_counter()
            executor.logits(ids)
            times.append(time.perf_counter() - begin)
        growth = max(growth, peak.growth_bytes)
    return {
        "seconds": round(min(times), 2),
        "peak_rss_growth_mib": round(growth / 2**20),
        "sent_mib": round(SENT["bytes"] / 2**20, 1),
    }


def weights(layers: int):
    spec = preset("llada-8b", layers)
    return spec, from_state_dict(spec, random_state_dict(spec, torch.bfloat16, seed=0))


def rank_main(rank: int, world: int, layers: int, lengths: list[int], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    dist.all_to_all = counted(dist.all_to_all)
    dist.all_gather = counted(dist.all_gather)
    spec, w = weights(layers)
    rows = []
    for kind, make in (("sequence-parallel", SequenceParallelExecutor), ("tensor-parallel", TensorParallelExecutor)):
        executor = make(spec, w)
        for length in lengths:
            rows.append({"executor": kind, "ranks": world, "rank": rank, "length": length, **step(executor, length)})
        del executor
    Path(f"{out}.{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--out", default="benchmarks/results/parallel.json")
    args = parser.parse_args()
    lengths = [int(n) for n in args.lengths.split(",")]
    torch.set_num_threads(2)
    spec, w = weights(args.layers)
    rows = [
        {"executor": "eager", "ranks": 1, "rank": 0, "length": n, **step(EagerExecutor(spec, w), n)} for n in lengths
    ]
    del w
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "p")
        mp.spawn(rank_main, args=(2, args.layers, lengths, out), nprocs=2)
        for rank in range(2):
            rows += json.loads(Path(f"{out}.{rank}.json").read_text())
    rows.sort(key=lambda r: (r["length"], r["executor"], r["rank"]))
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
    print(
        f"llada-8b dims, {args.layers} layers, bf16, full logits; peak RSS of this process: "
        f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024} MiB"
    )
    print("| executor | processes x threads | L | rank | step s | peak RSS growth MiB | sent MiB / step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        shape = "1 x 2" if r["ranks"] == 1 else "2 x 1"
        print(
            f"| {r['executor']} | {shape} | {r['length']} | {r['rank']} | {r['seconds']} "
            f"| {r['peak_rss_growth_mib']} | {r['sent_mib'] if r['ranks'] > 1 else '-'} |"
        )


if __name__ == "__main__":
    main()
