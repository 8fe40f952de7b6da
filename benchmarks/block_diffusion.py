"""Block diffusion (SDAR, LLaDA2.x) on this machine, random bf16 weights, next to LLaDA-8B's full canvas (#32).

(a) capacity: the longest prompt (with `--gen` tokens to generate) whose largest step fits an
    activation budget, the K/V cache on top of it (reported, not counted): eager (the official
    prefill: every prompt position's logits, the block-causal mask as a whole L x L tensor) vs
    mosaic (logits for the block's rows only, the mask one query block at a time, chunks from the
    search). Eager from its live-tensor timeline under FakeTensorMode, its cache taken off (an MoE
    model's measured with random weights instead: its routing depends on values); mosaic from the
    plan (an MoE step's expert buffers bounded by one expert receiving every token).

    python benchmarks/block_diffusion.py capacity --preset sdar-8b --layers 2 --budget 2GiB --gen 256 \\
        --out benchmarks/results/block_diffusion_capacity_sdar8b.json
    python benchmarks/block_diffusion.py capacity --preset llada2-mini --layers 2 --budget 2GiB --gen 256 \\
        --out benchmarks/results/block_diffusion_capacity_llada2mini.json

    LLaDA2.x keeps no cache (its official decoding recomputes the prefix at every step): its largest
    step is the last block's, the whole canvas block-causally; eager's is that of the first step of
    a request whose prompt ends in that block (the same shape), measured (an MoE).

(b) speed: one request generated whole by a random 2-layer sdar-8b (its defaults, temperature 0;
    and 1 step a block), a random 2-layer llada2-mini (2048 wide; its defaults, and 4 steps a block)
    and, with the official sampler, by a random 2-layer llada-8b at sdar-8b's width and a random
    2-layer llada-moe-7b at llada2-mini's (a step a token, mask-only logits), all on the Mosaic
    executor: forward passes per generated token and seconds per generated token, in one run; and
    the most requests of total length 4096 one batched step admits in `--budget` (the scheduler's
    admission: every request at its largest step, caches counted).

    python benchmarks/block_diffusion.py speed --layers 2 --prompt-tokens 256 --gen 32 --budget 2GiB \\
        --out benchmarks/results/block_diffusion_speed.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mosaic_dllm import LLM, GenerationConfig  # noqa: E402
from mosaic_dllm.bench.capacity import first_step_shape  # noqa: E402
from mosaic_dllm.bench.presets import preset  # noqa: E402
from mosaic_dllm.bench.step import StepRequest, measure, predict, random_weights  # noqa: E402
from mosaic_dllm.decoding import sampler_for  # noqa: E402
from mosaic_dllm.memory.sizes import mib, parse_bytes  # noqa: E402
from mosaic_dllm.plan.search import DoesNotFit, fit, longest, most_requests  # noqa: E402
from mosaic_dllm.plan.shapes import RequestShape, StepShape  # noqa: E402
from mosaic_dllm.plan.step_plan import PlanCache  # noqa: E402

DTYPE = torch.bfloat16


def capacity(args) -> dict:
    spec = preset(args.preset, args.layers)
    budget = parse_bytes(args.budget, "--budget", 1)
    sampler, plans = sampler_for(spec), PlanCache(spec, DTYPE)
    cfg = GenerationConfig(gen_length=args.gen, temperature=0.0)

    def shape(prompt: int):
        """The largest step of a request with `prompt` tokens, its cache left out of the budget."""
        resolved = sampler.resolve(cfg, prompt)
        first, _ = sampler.largest_steps(resolved, prompt)
        base = first_step_shape(spec, DTYPE, prompt + args.gen, prompt / (prompt + args.gen), 64)
        cache = sampler.cache_bytes(resolved, prompt, DTYPE)
        step = replace(base, lengths=(first.tokens,), cache_keys=first.keys, masked_keys=first.masked_keys)
        return replace(step, cache_bytes=0), cache

    def mosaic_fits(prompt: int) -> bool:
        try:
            fit(plans, shape(prompt)[0], budget, explain=False)
        except DoesNotFit:
            return False
        return True

    weights = []  # random weights, made once if eager's steps must be measured

    def eager_peak(prompt: int) -> int:
        resolved = sampler.resolve(cfg, prompt)
        request = StepRequest(prompt + args.gen, prompt, resolved)
        first, _ = sampler.largest_steps(resolved, prompt)
        if sampler.first_step(sampler.start(torch.zeros(prompt, dtype=torch.long), resolved, None)).ids.shape[1] < (
            first.tokens
        ):  # the largest step comes last (LLaDA2.x: the last block's, the whole canvas): the first step
            # of a request whose prompt ends in that block has its shape
            total = prompt + args.gen
            request = StepRequest(total, total - 1, sampler.resolve(replace(cfg, gen_length=1), total - 1))
        try:
            timeline = predict(spec, DTYPE, "eager", request)
        except NotImplementedError:  # MoE: routing depends on values, so measured with random weights
            if not weights:
                print("eager: random weights to measure with ...", file=sys.stderr)
                weights.append(random_weights(spec, DTYPE))
            timeline = measure(spec, weights[0], "eager", request).timeline
        return timeline.peak - shape(prompt)[1]  # its cache is allocated inside

    out = {"preset": args.preset, "layers": args.layers, "dtype": "bf16", "budget_bytes": budget, "gen": args.gen}
    for name, fits in (("mosaic", mosaic_fits), ("eager", lambda p: eager_peak(p) <= budget)):
        print(f"searching {name} ...", file=sys.stderr)
        found = longest(fits, start=64, limit=1 << 20, precision=64).max_len
        step, cache = shape(found)
        row = {"max_prompt": found, "max_total": found + args.gen, "cache_bytes_at_max": cache}
        if name == "mosaic":
            plan = fit(plans, step, budget).plan
            row |= {"predicted_peak_bytes": plan.predicted_peak_bytes, "chunks": plan.summary()["chunks"]}
        else:
            row["predicted_peak_bytes"] = eager_peak(found)
        out[name] = row
    out["mosaic_vs_eager"] = round(out["mosaic"]["max_prompt"] / out["eager"]["max_prompt"], 2)
    return out


def generate(llm: LLM, prompt: list[int], cfg: GenerationConfig) -> dict:
    llm.generate(prompt[:16], replace(cfg, gen_length=8, steps=min(cfg.steps or 8, 8)))  # kernels and plans warm
    begin = time.perf_counter()
    out = llm.generate(prompt, cfg)[0]
    seconds = time.perf_counter() - begin
    tokens = len(out.token_ids)
    return {
        "generated_tokens": tokens,
        "forward_passes": out.forward_passes,
        "passes_per_token": round(out.forward_passes / tokens, 3),
        "seconds_per_token": round(seconds / tokens, 4),
        "seconds": round(seconds, 2),
    }


def largest_batches(spec, budget: int, length: int = 4096) -> dict:
    """The most requests of total `length` (prompt half) one batched step admits in `budget`, caches
    counted: every one at its largest step (what a batch of newcomers gets), and, for block
    diffusion, one prefilling while the others run their blocks (the scheduler's admission once
    they are past their first step)."""
    plans, sampler = PlanCache(spec, DTYPE), sampler_for(spec)
    shape = first_step_shape(spec, DTYPE, length, 0.5, 64)
    most, plan = most_requests(plans, shape, budget)
    out = {"length": length, "all_at_their_largest_step": most, "predicted_peak_bytes": plan.predicted_peak_bytes}
    prompt, cfg = length // 2, sampler.resolve(GenerationConfig(gen_length=length // 2, temperature=0.0), length // 2)
    _, later = sampler.largest_steps(cfg, prompt)
    if later is None:
        return out
    block = RequestShape(1, later.tokens, cfg.block_length, shape.sampler_row_bytes, shape.cache_bytes, later.keys)
    first = RequestShape(1, shape.longest, cfg.block_length, shape.sampler_row_bytes, shape.cache_bytes)
    first = first._replace(keys=shape.cache_keys, masked_keys=shape.masked_keys)

    def fits(n: int) -> bool:
        try:
            fit(plans, StepShape.packing([first] + [block] * (n - 1), 64), budget, explain=False)
        except DoesNotFit:
            return False
        return True

    out["one_prefilling_the_others_in_blocks"] = longest(fits, start=1, limit=1 << 16).max_len
    return out


def speed(args) -> dict:
    from serve_throughput import random_checkpoint

    budget = parse_bytes(args.budget, "--budget", 1)
    prompt = torch.randint(0, 100_000, (args.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    rows, batches = {}, {}
    runs = {
        "sdar-8b": {
            f"SDAR defaults (block 4, 4 steps, dynamic 0.85), gen {args.gen}": dict(temperature=0.0),
            f"SDAR block 4, 1 step a block, gen {args.gen}": dict(temperature=0.0, steps=1),
        },
        "llada-8b": {
            f"LLaDA official (a step a token, one block), gen {args.gen}": dict(temperature=0.0, steps=args.gen),
        },
        "llada-moe-7b": {
            f"LLaDA-MoE official (a step a token, one block), gen {args.gen}": dict(temperature=0.0, steps=args.gen),
        },
        "llada2-mini": {
            f"LLaDA2.x defaults (block 32, 32 steps, threshold 0.95), gen {args.gen}": dict(temperature=0.0),
            f"LLaDA2.x block 32, 4 steps a block, gen {args.gen}": dict(temperature=0.0, steps=4),
        },
    }
    runs = {name: settings for name, settings in runs.items() if name in args.models}
    for name, settings in runs.items():
        print(f"{name}: writing a random checkpoint ...", file=sys.stderr)
        llm = LLM(random_checkpoint(name, args.layers), dtype="bf16", max_batch=1)
        for label, extra in settings.items():
            print(f"  {label} ...", file=sys.stderr)
            rows[label] = generate(llm, prompt, GenerationConfig(gen_length=args.gen, **extra))
        batches[name] = largest_batches(preset(name, args.layers), budget)
        del llm
    return {
        "layers": args.layers,
        "dtype": "bf16",
        "prompt_tokens": args.prompt_tokens,
        "gen": args.gen,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "runs": rows,
        "budget_bytes": budget,
        "largest_batch_at_4096": batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["capacity", "speed"])
    parser.add_argument("--preset", default="sdar-8b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--budget", default="2GiB")
    parser.add_argument("--gen", type=int, default=256)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument(
        "--models", nargs="+", default=["sdar-8b", "llada-8b", "llada-moe-7b", "llada2-mini"], help="speed: presets"
    )
    parser.add_argument("--out")
    args = parser.parse_args()
    record = capacity(args) if args.what == "capacity" else speed(args)
    text = json.dumps(record, indent=2)
    print(text)
    if args.what == "capacity":
        for name in ("eager", "mosaic"):
            r = record[name]
            print(
                f"{name:7} longest prompt {r['max_prompt']:>7} (+{args.gen}), peak {mib(r['predicted_peak_bytes'])}, "
                f"cache {mib(r['cache_bytes_at_max'])}",
                file=sys.stderr,
            )
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
