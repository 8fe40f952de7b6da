"""Likelihood requests one at a time vs sharing forward passes, on the embedded default model.

    python benchmarks/likelihood_batching.py --requests 48 --json benchmarks/results/likelihood_batching_default.json

Requests: lines of the standard library's `textwrap.py` (each line's first half the context, the
rest the continuation), LLaDA's official estimator with its default settings (128 samples, 32 per
pass). Both ways are run in one process, one after the other; the values must be equal.
"""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap
import time
from pathlib import Path

import torch

from mosaic_dllm import LLM
from mosaic_dllm.decoding.likelihood import LikelihoodOptions


def requests(llm: LLM, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    lines = [line.strip() for line in inspect.getsource(textwrap).splitlines() if len(line.strip()) > 30]
    pairs = []
    for line in lines[:count]:
        cut = len(line) // 2
        prefix, target = (
            llm.tokenizer.encode(line[:cut]),
            llm.tokenizer.encode(line)[len(llm.tokenizer.encode(line[:cut])) :],
        )
        if prefix and target:
            pairs.append((torch.tensor(prefix), torch.tensor(target)))
    return pairs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--copies-per-pass", type=int, default=128)
    parser.add_argument("--json")
    args = parser.parse_args()
    llm = LLM()
    pairs = requests(llm, args.requests)
    record = {"requests": len(pairs), "mc_num": 128, "batch_size": 32, "threads": torch.get_num_threads()}
    values = {}
    for name, per_pass in (("one at a time", 0), ("shared passes", args.copies_per_pass)):
        options = LikelihoodOptions(copies_per_pass=per_pass)
        start = time.perf_counter()
        values[name] = llm.sampler.log_likelihoods(llm.executor, pairs, torch.Generator().manual_seed(1234), options)
        seconds = time.perf_counter() - start
        record[name] = {"seconds": round(seconds, 2), "requests_per_second": round(len(pairs) / seconds, 2)}
        print(f"{name:>14}: {seconds:.2f} s, {len(pairs) / seconds:.2f} requests/s")
    record["equal"] = values["one at a time"] == values["shared passes"]
    record["speedup"] = round(record["one at a time"]["seconds"] / record["shared passes"]["seconds"], 2)
    print(f"values equal: {record['equal']}; speedup {record['speedup']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
