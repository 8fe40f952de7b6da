"""Likelihood requests one at a time vs sharing forward passes, on the embedded default model.

    B="python benchmarks/likelihood_batching.py --requests 48"
    $B --json benchmarks/results/likelihood_batching_default.json
    $B --spread --json benchmarks/results/likelihood_spread_default.json

    B="python benchmarks/likelihood_batching.py --task benchmarks/tasks/python_next_line.jsonl"
    $B --json benchmarks/results/likelihood_batching_task.json
    $B --spread --json benchmarks/results/likelihood_spread_task.json

`--family dream`: Dream's estimator (HKUNLP/Dream eval.py) on a Dream-architecture checkpoint of
the default model's sizes and tokenizer with random weights (no trained Dream fits here): its
requests/s batched vs one at a time; its accuracy is chance by construction, printed as a check.

Requests: lines of the standard library's `textwrap.py` (each line's first half the context, the
rest the continuation), or with `--task` every (context, choice) pair of a multiple-choice task
(JSONL: context, choices, gold), tokenised as the family's harness does (`Sampler.encode_pair`),
with the task's accuracy (the choice of highest estimate, as lm-eval's `acc`). LLaDA's official
estimator with its default settings (128 samples, 32 per pass). Both ways are run in one process,
one after the other; the values must be equal. `--spread`: instead, how much the estimate moves
between seeds at mc_num 8, 32 and 128 (the standard deviation over 5 seeds, averaged over the
requests; with `--task`, the accuracy at each), so users can choose mc_num.
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


def random_dream_like_default(path: Path) -> Path:
    """A Dream checkpoint with the default model's sizes and tokenizer, random weights."""
    import shutil
    from dataclasses import replace

    from mosaic_dllm import checkpoint
    from mosaic_dllm.engine import default_model_path
    from mosaic_dllm.models.weights import random_state_dict

    llada = LLM().spec
    spec = replace(llada, family="dream", logit_shift=True, qkv_bias=True, rope_full_precision=False)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(default_model_path() / name, path / name)
    checkpoint.save(path, spec, random_state_dict(spec, torch.float32, seed=0))
    return path


def task_requests(
    llm: LLM, path: Path, most: int | None = None
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[dict]]:
    """Every (context, choice) pair of a multiple-choice task's first `most` items, item after item."""
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:most]
    options = LikelihoodOptions()
    pairs = [
        tuple(torch.tensor(ids) for ids in llm.sampler.encode_pair(llm.tokenizer, item["context"], choice, options))
        for item in items
        for choice in item["choices"]
    ]
    return pairs, items


def accuracy(values: list[float], items: list[dict]) -> float:
    """The share of items whose gold choice has the highest estimate (lm-eval's `acc`)."""
    right, at = 0, 0
    for item in items:
        scores = values[at : at + len(item["choices"])]
        right += max(range(len(scores)), key=scores.__getitem__) == item["gold"]
        at += len(scores)
    return right / len(items)


def spread(llm: LLM, pairs: list[tuple[torch.Tensor, torch.Tensor]], items: list[dict], seeds: int = 5) -> dict:
    """The mean over requests of the estimate's standard deviation across seeds, per mc_num (and
    the task's mean accuracy over the seeds)."""
    record = {"requests": len(pairs), "seeds": seeds}
    for mc_num in (8, 32, 128):
        options = LikelihoodOptions(mc_num=mc_num, batch_size=min(mc_num, 32))
        runs = torch.tensor(
            [
                llm.sampler.log_likelihoods(llm.executor, pairs, torch.Generator().manual_seed(s), options)
                for s in range(seeds)
            ]
        )
        std, mean = runs.std(dim=0).mean().item(), runs.mean().item()
        record[f"mc_num={mc_num}"] = {"mean_estimate": round(mean, 3), "mean_std_over_seeds": round(std, 3)}
        if items:
            acc = sum(accuracy(r.tolist(), items) for r in runs) / seeds
            record[f"mc_num={mc_num}"]["mean_accuracy"] = round(acc, 4)
        print(f"mc_num {mc_num:>4}: mean log-likelihood {mean:.3f}, std over seeds {std:.3f} (mean over requests)")
    return record


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--copies-per-pass", type=int, default=128)
    parser.add_argument("--task", type=Path, help="a multiple-choice task's JSONL (context, choices, gold)")
    parser.add_argument("--items", type=int, help="with --task: its first N items only")
    parser.add_argument("--seeds", type=int, default=5, help="with --spread: seeds per mc_num")
    parser.add_argument("--family", choices=("llada", "dream"), default="llada", help="whose estimator (see above)")
    parser.add_argument("--spread", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    if args.family == "dream":
        import tempfile

        llm = LLM(random_dream_like_default(Path(tempfile.mkdtemp())))
    else:
        llm = LLM()
    pairs, items = task_requests(llm, args.task, args.items) if args.task else (requests(llm, args.requests), [])
    if args.spread:
        record = spread(llm, pairs, items, args.seeds)
        if args.json:
            Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
        return
    record = {"requests": len(pairs), "mc_num": 128, "batch_size": 32, "threads": torch.get_num_threads()}
    record["estimator"] = args.family
    values = {}
    for name, per_pass in (("one at a time", 0), ("shared passes", args.copies_per_pass)):
        options = LikelihoodOptions(copies_per_pass=per_pass)
        start = time.perf_counter()
        values[name] = llm.sampler.log_likelihoods(llm.executor, pairs, torch.Generator().manual_seed(1234), options)
        seconds = time.perf_counter() - start
        record[name] = {"seconds": round(seconds, 2), "requests_per_second": round(len(pairs) / seconds, 2)}
        print(f"{name:>14}: {seconds:.2f} s, {len(pairs) / seconds:.2f} requests/s")
    record["equal"] = values["one at a time"] == values["shared passes"]
    if items:
        record |= {"task": str(args.task), "items": len(items), "accuracy": accuracy(values["shared passes"], items)}
        print(f"accuracy on {len(items)} items: {record['accuracy']:.3f}")
    record["speedup"] = round(record["one at a time"]["seconds"] / record["shared passes"]["seconds"], 2)
    print(f"values equal: {record['equal']}; speedup {record['speedup']}x")
    if args.json:
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
