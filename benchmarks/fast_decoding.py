"""Fast-dLLM's decoding next to the official sampler, in one process, with the Mosaic executor:
forward passes per generated token, seconds per generated token (or per forward pass), and peak
activation memory per step, measured (live tensors under the tracker, plus the step's arena) next
to the plan's prediction (which counts the block cache).

(a) The embedded default model (trained on Python source, so its confidences mean something), or
    `--model DIR`: 8 function heads, each generated whole, one request at a time. Passes are counted
    per generated position (Fast-dLLM's count: the EOS padding after an answer included) and per
    answer token (every pass charged to the tokens before the first EOS).

    python benchmarks/fast_decoding.py --thresholds 0.9 0.1 --out benchmarks/results/fast_decoding_default.json

(b) A random llada-8b checkpoint (2 layers): the first steps of one request (a block's first step
    runs the whole canvas; with a cache, the others run a window), time (median) and memory per pass.

    python benchmarks/fast_decoding.py --preset llada-8b --layers 2 --prompt-tokens 512 --gen 256 \\
        --block 32 --steps-per-setting 4 --out benchmarks/results/fast_decoding_llada8b.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.memory.accounting import LiveTensorTracker
from mosaic_dllm.memory.sizes import mib


def size(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n < 10 << 20 else mib(n)


PROMPTS = [  # function heads, ending before the line break (the tokenizer joins it with the indentation)
    "def is_prime(n):",
    'def read_lines(path):\n    """Return the lines of the file at path."""',
    "class Stack:\n    def __init__(self):",
    "    def __repr__(self):",
    "def main():\n    parser = argparse.ArgumentParser()",
    "import os\nimport sys\n\n\ndef copy_tree(src, dst):",
    "    def close(self):",
    "def _check_arg(name, value):\n    if not isinstance(value, str):",
]


def settings(thresholds: list[float]) -> dict[str, dict]:
    rows = {"official": {}}
    for t in thresholds:
        rows[f"threshold {t}"] = {"threshold": t}
        rows[f"threshold {t} + prefix cache"] = {"threshold": t, "cache": "prefix"}
        rows[f"threshold {t} + dual cache"] = {"threshold": t, "cache": "dual"}
    return rows


def run_steps(llm: LLM, prompt: list[int], cfg: GenerationConfig, most: int | None, track: bool) -> list[dict]:
    """Step one request through the scheduler (at most `most` steps); per step: seconds, kind,
    tokens run, predicted peak (plan) and, when tracked, the measured peak (live tensors + arena)."""
    request = llm.request(prompt, cfg)
    llm.scheduler.submit(request)
    steps: list[dict] = []
    tracker = LiveTensorTracker() if track else None
    if tracker is not None:
        tracker.__enter__()
    try:
        while not request.result.done() and (most is None or len(steps) < most):
            begin, first = time.perf_counter(), len(tracker.timeline.records) if tracker else 0
            plan = llm.scheduler.step().plan
            seconds = time.perf_counter() - begin
            row = {
                "seconds": seconds,
                "kind": "window" if plan.graph.shape.cache_keys else "whole canvas",
                "tokens": plan.graph.shape.tokens,
                "predicted_peak_bytes": plan.predicted_peak_bytes,
                "cache_bytes": plan.graph.shape.cache_bytes,
            }
            if tracker is not None:
                live = max((r.live_bytes for r in tracker.timeline.records[first:]), default=0)
                row["measured_peak_bytes"] = live + plan.arena_bytes
            steps.append(row)
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
        if not request.result.done():
            request.cancelled.set()
            llm.scheduler.step()
    return steps


def default_model(args) -> dict:
    llm = LLM(args.model, max_batch=1)
    prompts = [llm.encode(p) for p in PROMPTS]
    base = dict(gen_length=args.gen, steps=args.gen, block_length=args.block)
    rows = {}
    for name, extra in settings(args.thresholds).items():
        cfg = GenerationConfig(**base, **extra)
        outs = [llm.generate(p, cfg)[0] for p in prompts]  # timed, untracked
        tokens = sum(len(o.token_ids) for o in outs)
        answer = sum(o.completion_tokens - (o.finish_reason == "stop") for o in outs)
        memory = run_steps(llm, prompts[0], cfg, None, track=True)
        rows[name] = {
            "forward_passes": sum(o.forward_passes for o in outs),
            "generated_tokens": tokens,
            "passes_per_token": sum(o.forward_passes for o in outs) / tokens,
            "answer_tokens": answer,
            "passes_per_answer_token": sum(o.forward_passes for o in outs) / max(answer, 1),
            "seconds_per_token": sum(o.seconds for o in outs) / tokens,
            "measured_peak_bytes": max(s["measured_peak_bytes"] for s in memory),
            "predicted_peak_bytes": max(s["predicted_peak_bytes"] for s in memory),
            "cache_bytes": max(s["cache_bytes"] for s in memory),
        }
        llm.executor.release()
    return rows


def preset_model(args) -> dict:
    from serve_throughput import random_checkpoint

    llm = LLM(random_checkpoint(args.preset, args.layers), dtype="bf16", max_batch=1)
    prompt = torch.randint(0, llm.spec.vocab_size - 1000, (args.prompt_tokens,), generator=torch.Generator()).tolist()
    base = dict(gen_length=args.gen, steps=args.gen, block_length=args.block)
    rows = {}
    for name, extra in settings(args.thresholds).items():
        cfg = GenerationConfig(**base, **extra)
        run_steps(llm, prompt, cfg, 1, track=False)  # kernels warm
        timed = run_steps(llm, prompt, cfg, args.steps_per_setting, track=False)
        tracked = run_steps(llm, prompt, cfg, args.steps_per_setting, track=True)
        row = {}
        for kind in ("whole canvas", "window"):
            mine = [i for i, s in enumerate(timed) if s["kind"] == kind]
            if not mine:
                continue
            row[kind] = {
                "passes": len(mine),
                "tokens_per_pass": timed[mine[0]]["tokens"],
                "seconds_per_pass": statistics.median(timed[i]["seconds"] for i in mine),
                "measured_peak_bytes": max(tracked[i]["measured_peak_bytes"] for i in mine),
                "predicted_peak_bytes": max(tracked[i]["predicted_peak_bytes"] for i in mine),
                "cache_bytes": tracked[mine[0]]["cache_bytes"],
            }
        rows[name] = row
        llm.executor.release()
    return rows


def print_table(record: dict) -> None:
    for name, row in record["rows"].items():
        if "passes_per_token" in row:
            print(
                f"{name:32} passes/token {row['passes_per_token']:.3f} "
                f"(per answer token {row['passes_per_answer_token']:.3f}, {row['answer_tokens']} before EOS)  "
                f"s/token {row['seconds_per_token']:.4f}  "
                f"peak {size(row['measured_peak_bytes'])} measured, {size(row['predicted_peak_bytes'])} planned "
                f"(cache {size(row['cache_bytes'])})"
            )
            continue
        for kind, r in row.items():
            print(
                f"{name:32} {kind:12} {r['tokens_per_pass']:5} tokens  {r['seconds_per_pass']:.3f} s/pass  "
                f"peak {size(r['measured_peak_bytes'])} measured, {size(r['predicted_peak_bytes'])} planned "
                f"(cache {size(r['cache_bytes'])})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint directory instead of the embedded default model")
    parser.add_argument("--preset", help="a random checkpoint of this preset (e.g. llada-8b) instead of the default")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--gen", type=int, help="tokens to generate (default 48; with --preset 256)")
    parser.add_argument("--block", type=int, help="block length (default 16; with --preset 32)")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9])
    parser.add_argument("--steps-per-setting", type=int, default=4, help="with --preset: steps measured per setting")
    parser.add_argument("--out", help="write the record as JSON here")
    args = parser.parse_args()
    args.gen = args.gen or (256 if args.preset else 48)
    args.block = args.block or (32 if args.preset else 16)
    torch.manual_seed(0)
    record = {
        "model": f"{args.preset} ({args.layers} layers, random bf16)"
        if args.preset
        else f"{args.model or 'default model'} (bf16, as trained models are exported)",
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "rows": preset_model(args) if args.preset else default_model(args),
    }
    print_table(record)
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
