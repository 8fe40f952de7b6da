"""Sequence and tensor parallel steps vs one process, on this machine (#31).

    python benchmarks/parallel.py --lengths 1024,2048 --out benchmarks/results/parallel.json
    python benchmarks/parallel.py --planned 128MiB --out benchmarks/results/parallel_planned.json
    python benchmarks/parallel.py --planned 128MiB --kinds tensor --out benchmarks/results/parallel_planned_tp.json

`--planned BUDGET`: the planned executors. The longest first step (prompt half of L, the first
block of 32 masked rows read) the search fits into BUDGET per process, predicted for one process
(Mosaic) and for 2 sequence-parallel ranks; then one process of 2 threads runs its longest step
and 2 ranks of 1 thread each run the same length and their own longest: per run, the predicted
peak (arena + workspace), the measured peak RSS growth over the first step (arena included), the
time of the second, and the bytes each rank sends per step; and a length 5% over the ranks'
longest, refused on every rank. Tensor parallel (`--kinds tensor`): 2 ranks at their own longest.
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

from mosaic_dllm.bench.capacity import first_step_shape, mosaic_capacity  # noqa: E402
from mosaic_dllm.bench.presets import preset  # noqa: E402
from mosaic_dllm.memory.rss import PeakMemory  # noqa: E402
from mosaic_dllm.memory.sizes import parse_bytes  # noqa: E402
from mosaic_dllm.models.weights import from_state_dict, random_state_dict  # noqa: E402
from mosaic_dllm.plan.search import DoesNotFit  # noqa: E402
from mosaic_dllm.runtime import (  # noqa: E402
    EagerExecutor,
    EagerSequenceParallelExecutor,
    EagerTensorParallelExecutor,
    ExecutorOptions,
    MosaicExecutor,
    SequenceParallelExecutor,
    TensorParallelExecutor,
)

SENT = {"bytes": 0}
ALL_TO_ALL_SINGLE = dist.all_to_all_single
ROWS = 32  # --planned: the logits rows a step reads (one block of 32, as LLaDA's semi-autoregressive sampler)


def counted(collective):
    """A collective that adds what this rank sends to SENT (a peer's share of its inputs)."""

    def call(outputs, inputs, *args, **kwargs):
        world, rank = dist.get_world_size(), dist.get_rank()
        if isinstance(inputs, list):  # all_to_all: every part but this rank's own goes out
            SENT["bytes"] += sum(t.nbytes for i, t in enumerate(inputs) if i != rank)
        elif collective is ALL_TO_ALL_SINGLE:  # rows split over the ranks (evenly unless given)
            splits = args[1] if len(args) > 1 and args[1] else [inputs.shape[0] // world] * world
            SENT["bytes"] += (inputs.shape[0] - splits[rank]) * (inputs[0].nbytes if inputs.shape[0] else 0)
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


def join(rank: int, world: int, out: str, layers: int):
    """A rank of one thread in the gloo group, its collectives counted; the model's (spec, weights)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{out}.store", rank=rank, world_size=world)
    count_collectives()
    return weights(layers)


def rank_main(rank: int, world: int, layers: int, lengths: list[int], out: str) -> None:
    spec, w = join(rank, world, out, layers)
    rows = []
    for kind, make in (
        ("sequence-parallel-eager", EagerSequenceParallelExecutor),
        ("tensor-parallel-eager", EagerTensorParallelExecutor),
    ):
        executor = make(spec, w)
        for length in lengths:
            rows.append({"executor": kind, "ranks": world, "rank": rank, "length": length, **step(executor, length)})
        del executor
    Path(f"{out}.{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def count_collectives() -> None:
    dist.all_to_all = counted(dist.all_to_all)
    dist.all_gather = counted(dist.all_gather)
    dist.all_to_all_single = counted(ALL_TO_ALL_SINGLE)


def planned_step(executor, spec, length: int) -> dict:
    """A first step at `length` (the second half masked, its rows read): memory over the first
    run, time of the second."""
    shape = first_step_shape(spec, torch.bfloat16, length, 0.5, executor.options.row_chunk, rows=ROWS)
    ids = torch.randint(0, 100000, (1, length), generator=torch.Generator().manual_seed(1))
    rows = torch.arange(length // 2, length // 2 + ROWS)

    def run() -> None:
        for _ in executor.row_logits(ids, rows, shape.sampler_row_bytes):
            pass

    with PeakMemory(torch.device("cpu")) as peak:
        run()
    SENT["bytes"] = 0
    begin = time.perf_counter()
    run()
    seconds = time.perf_counter() - begin
    plan = executor.last_plan
    return {
        "length": length,
        "seconds": round(seconds, 2),
        "predicted_peak_mib": round(plan.predicted_peak_bytes / 2**20, 1),
        "peak_rss_growth_mib": round(peak.growth_bytes / 2**20, 1),
        "chunks": plan.summary()["chunks"],
        "sent_mib": round(SENT["bytes"] / 2**20, 1),
    }


def refused(executor, spec, length: int) -> str:
    try:
        planned_step(executor, spec, length)
    except DoesNotFit as exc:
        return f"DoesNotFit: {str(exc)[:120]}"
    return "ran"


def planned_rank(rank: int, world: int, layers: int, budget: int, lengths: dict[str, list[int]], out: str) -> None:
    """Each kind's lengths on this rank (the last one's 5% longer refused), fresh executors each."""
    spec, w = join(rank, world, out, layers)
    rows = []
    for kind, parallel in (
        ("sequence-parallel", SequenceParallelExecutor),
        ("tensor-parallel", TensorParallelExecutor),
    ):
        for n in lengths.get(kind, []):  # a fresh executor each: its arena's pages are part of the peak
            executor = parallel(spec, w, ExecutorOptions(memory_budget=budget))
            rows.append({"executor": kind, "ranks": world, "rank": rank, **planned_step(executor, spec, n)})
            executor.release()
        if lengths.get(kind):
            over = lengths[kind][-1] * 105 // 100
            status = refused(parallel(spec, w, ExecutorOptions(memory_budget=budget)), spec, over)
            rows.append({"executor": kind, "ranks": world, "rank": rank, "length": over, "status": status})
    Path(f"{out}.{rank}.json").write_text(json.dumps(rows))
    dist.destroy_process_group()


def planned(args: argparse.Namespace) -> None:
    budget = parse_bytes(args.planned, "--planned", 1)
    spec, w = weights(args.layers)
    kinds = args.kinds.split(",")

    def longest(**ranks) -> int:
        return mosaic_capacity(spec, torch.bfloat16, budget, 0.5, 64, rows=ROWS, **ranks)["max_len"]

    predicted = {"mosaic": longest()}
    lengths: dict[str, list[int]] = {}
    if "sequence" in kinds:  # the one-process length, then the ranks' own longest
        predicted["sequence-parallel"] = longest(ranks=2)
        lengths["sequence-parallel"] = [predicted["mosaic"], predicted["sequence-parallel"]]
    if "tensor" in kinds:
        predicted["tensor-parallel"] = longest(tensor_ranks=2)
        lengths["tensor-parallel"] = [predicted["tensor-parallel"]]
    torch.set_num_threads(2)
    rows = []
    if "mosaic" in kinds:
        one = MosaicExecutor(spec, w, ExecutorOptions(memory_budget=budget))
        rows.append({"executor": "mosaic", "ranks": 1, "rank": 0, **planned_step(one, spec, predicted["mosaic"])})
        del one
    del w
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "p")
        mp.spawn(planned_rank, args=(2, args.layers, budget, lengths, out), nprocs=2)
        for rank in range(2):
            rows += json.loads(Path(f"{out}.{rank}.json").read_text())
    record = {
        "budget_per_process_mib": budget // 2**20,
        "layers": args.layers,
        "predicted_max_len": predicted,
        "runs": rows,
    }
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(
        f"llada-8b dims, {args.layers} layers, bf16, budget {budget // 2**20} MiB a process; "
        f"predicted L_max {predicted}"
    )
    print(
        "| executor | processes x threads | L | rank | predicted peak MiB | peak RSS growth MiB | step s "
        "| sent MiB / step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "status" in r:
            print(f"| {r['executor']} | 2 x 1 | {r['length']} | {r['rank']} | {r['status']} |||")
            continue
        shape = "1 x 2" if r["ranks"] == 1 else "2 x 1"
        print(
            f"| {r['executor']} | {shape} | {r['length']} | {r['rank']} | {r['predicted_peak_mib']} "
            f"| {r['peak_rss_growth_mib']} | {r['seconds']} | {r['sent_mib'] if r['ranks'] > 1 else '-'} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--lengths", default="1024,2048")
    parser.add_argument("--out", default="benchmarks/results/parallel.json")
    parser.add_argument("--planned", metavar="BUDGET", help="the planned executors at this budget a process")
    parser.add_argument("--kinds", default="mosaic,sequence,tensor", help="--planned: which runs")
    args = parser.parse_args()
    if args.planned:
        return planned(args)
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
