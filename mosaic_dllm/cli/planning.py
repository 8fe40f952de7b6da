"""`mosaic plan` and `mosaic bench`: plans and measurements from arguments; reports come from plan/ and bench/."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ..memory.sizes import gib, mib
from ..models.quantized import check_shapes, parse_quantization


def _bench_base(args: argparse.Namespace, budget: int | None = None) -> tuple[dict, list[str], dict[str, dict]]:
    from ..bench.variants import variant_options

    if bool(args.preset) == bool(args.model):
        raise ValueError("give exactly one of --preset NAME or --model PATH")
    executors = [e.strip() for e in args.executors.split(",") if e.strip()]
    options = variant_options(executors, args.row_chunk, budget)
    generation = {"temperature": args.temperature}  # unset settings: the sampler's benchmark settings
    job = {
        "preset": args.preset,
        "model": args.model,
        "layers": args.layers,
        "alpha": args.alpha,
        "dtype": args.dtype,
        "device": args.device,
        "quantize": args.quantize,
        "quantize_head": args.quantize_head,
        "quantize_embeddings": args.quantize_embeddings,
        "generation": generation,
    }
    return job, executors, options


def bench_memory(args: argparse.Namespace) -> int:
    from ..bench.runner import memory_records, memory_table
    from ..memory.sizes import parse_bytes

    job, executors, options = _bench_base(args, parse_bytes(args.budget, "--budget", 1) if args.budget else None)
    try:
        lengths = [int(n) for n in args.lengths.split(",")]
    except ValueError:
        raise ValueError(f"--lengths takes comma-separated integers, got {args.lengths!r}") from None
    if not lengths or min(lengths) < 2:
        raise ValueError(f"--lengths must be integers >= 2, got {args.lengths!r}")
    records = memory_records(job, lengths, executors, options, lambda m: print(m, file=sys.stderr))
    failed = _failed_probes(records)
    timelines = {r["executor"]: r.pop("timeline") for r in records if r.get("timeline")}
    for r in records:
        r.pop("timeline", None)
    print(memory_table(records))
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    if args.plot:
        from ..bench.plot import plot_memory

        name = args.preset or Path(args.model).name
        plot_memory(
            records, timelines, args.plot, f"{name}, {args.layers or 'all'} layers, {args.dtype}, alpha {args.alpha}"
        )
    return _report_failures(failed)


def _failed_probes(records: list[dict]) -> list[str]:
    """Probes that failed for another reason than "does not fit" (that one is a result)."""
    from ..bench.worker import failed

    return [f"{r['executor']} at L={r['length']}: {r['status']}" for r in records if failed(r)]


def _report_failures(failed: list[str]) -> int:
    for line in failed:
        print(f"error: probe failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def bench_max_len(args: argparse.Namespace) -> int:
    from ..bench.runner import max_len_records
    from ..memory.sizes import parse_bytes

    budget = parse_bytes(args.budget, "--budget", 1)
    job, executors, options = _bench_base(args, budget)
    records = max_len_records(
        job,
        executors,
        options,
        budget,
        args.start,
        args.step,
        args.limit,
        args.precision,
        args.measure_up_to,
        lambda m: print(m, file=sys.stderr),
    )
    print(f"activation budget {mib(budget)}")
    for r in records:
        errors = [p["prediction_error"] for p in r["probes"] if "prediction_error" in p]
        worst = f", prediction error at measured lengths <= {max(map(abs, errors)):.2%}" if errors else ""
        print(
            f"{r['executor']:<8} L_max={r['max_len']:>7} ({r['max_len_is']}; measured up to "
            f"{r['measured_up_to']}){worst}  ratio vs eager: {r.get('ratio_vs_eager', '-')}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=2) + "\n")
    probes = [p | {"executor": r["executor"]} for r in records for p in r["probes"]]
    return _report_failures(_failed_probes(probes))


def plan(args: argparse.Namespace) -> int:
    """Plan one first denoising step from the config alone: no weights are read, nothing heavy runs."""
    from .. import checkpoint
    from ..bench.capacity import first_step_shape
    from ..bench.presets import preset
    from ..plan.compute import recompute_cost
    from ..plan.offsets import ascii_map
    from ..plan.report import plan_report
    from ..plan.step_plan import PlanCache

    if bool(args.preset) == bool(args.model):
        raise ValueError("give exactly one of --preset NAME or --model PATH")
    spec = preset(args.preset, args.layers) if args.preset else checkpoint.read_spec(args.model)[0]
    dtype = checkpoint.parse_dtype(args.dtype) or checkpoint.parse_dtype(spec.torch_dtype) or checkpoint.DTYPES["bf16"]
    if scheme := parse_quantization(args.quantize, args.quantize_head, args.quantize_embeddings):
        check_shapes(spec, scheme)
        spec = replace(spec, quantization=scheme)
    profile = _device_profile(args)
    ranks = _ranks(args, spec)
    if args.max_len:
        return _plan_max_len(args, spec, dtype, profile, ranks)
    if len(ranks) > 1:
        raise ValueError("--nproc takes one rank count with --length (a list with --max-len)")
    if args.length is None:
        raise ValueError("give --length L (or --max-len with --budget or --device-memory)")
    if args.length < 2:
        raise ValueError(f"--length must be at least 2, got {args.length}")
    if args.rows is not None and not 1 <= args.rows <= args.length:
        raise ValueError(f"--rows must be in 1..{args.length} (the positions of --length), got {args.rows}")
    if args.cache != "none" and args.block_length < 1:
        raise ValueError(f"--block-length must be a positive integer, got {args.block_length}")
    shape = first_step_shape(spec, dtype, args.length, args.alpha, args.row_chunk, args.cfg_scale, args.rows)
    shape = replace(shape, ranks=ranks[0], tensor_ranks=args.tp)
    cache = args.cache
    if spec.block_size:  # block diffusion: its decoding's own cache (SDAR) or none (LLaDA2.x)
        if args.cache != "none":
            raise ValueError("--cache is Fast-dLLM's; a block-diffusion model decodes with its own attention")
        cache = "block diffusion: K/V of every position before the last block"
    elif args.cache != "none":  # the request's block cache, alive through its steps (models/kv_cache.py)
        from ..decoding.parallel import cache_positions
        from ..models.kv_cache import BlockCache

        positions = cache_positions(args.length, args.block_length, args.cache)
        if positions < 1:
            raise ValueError(f"--block-length ({args.block_length}) must be shorter than --length ({args.length})")
        shape = replace(shape, cache_bytes=BlockCache(spec, positions).nbytes(dtype))
    plans = PlanCache(spec, dtype, profile=profile)
    summary = {
        "model": args.preset or str(args.model),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": scheme.name if scheme else "unquantized",
        "device": profile.describe(),
        "ranks": ranks[0],
        "tensor_ranks": args.tp,
    }
    if args.max_batch:
        return _plan_max_batch(args, summary, shape, plans)
    if args.budget:  # the lazy search's choice for this budget (DoesNotFit names the floor)
        from ..memory.sizes import parse_bytes
        from ..plan.search import fit

        budget = parse_bytes(args.budget, "--budget", 1)
        result = fit(plans, shape, budget, _chunk_groups(args))
        plan = result.plan
        search = {"budget_bytes": budget, "plans_tried": result.plans_tried, "search_seconds": round(result.seconds, 6)}
    else:
        plan, search = plans.get(shape), {}
    cost = recompute_cost(spec, plan.graph.shape)
    summary |= plan.summary() | search | {"kv_passes_per_layer": cost.passes, "extra_compute": cost.extra_fraction}
    if args.json:
        print(json.dumps(summary))
        return 0
    print(plan_report(summary, spec.num_layers, args.length, shape, plan, cost, search, cache))
    if args.ascii:
        print(ascii_map(plan.buffers, plan.plan))
    return 0


def _plan_max_batch(args: argparse.Namespace, summary: dict, shape, plans) -> int:
    """The most requests like this one (their first, largest step) one batched step can run within
    the budget: what the scheduler's admission would let in together."""
    from ..memory.sizes import parse_bytes
    from ..plan.report import max_batch_report
    from ..plan.search import most_requests

    if not args.budget:
        raise ValueError("--max-batch needs --budget (the activation memory a step may use)")
    budget = parse_bytes(args.budget, "--budget", 1)
    most, plan = most_requests(plans, shape, budget, _chunk_groups(args))
    record = summary | {"length": args.length, "budget_bytes": budget, "max_batch": most}
    if plan is not None:
        record |= {"predicted_peak_activation_bytes": plan.predicted_peak_bytes, "chunks": plan.summary()["chunks"]}
    print(json.dumps(record) if args.json else max_batch_report(record))
    return 0


def _device_profile(args: argparse.Namespace):
    """The device a plan is for: another machine's saved profile (--profile), else this one's --device."""
    import torch

    from ..device import DeviceProfile, profile_for

    if args.profile:
        return DeviceProfile.load(args.profile)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (plan for one with --profile FILE)")
    return profile_for(args.device)


def _ranks(args: argparse.Namespace, spec) -> list[int]:
    """--nproc: sequence-parallel rank counts to plan one rank's part for (each checked against the heads)."""
    from ..kernels.sequence_parallel import check_heads
    from ..kernels.tensor_parallel import check_rows

    if args.tp < 1:
        raise ValueError(f"--tp takes a rank count >= 1, got {args.tp}")
    if args.tp > 1:
        check_rows(spec, args.tp)
        if spec.quantization is not None:
            raise ValueError("tensor parallel weights are not quantized yet: plan --tp without --quantize")
        if args.nproc is not None and args.nproc.strip() != "1":
            raise ValueError("sequence and tensor parallel together are not built: --nproc or --tp")
    if args.nproc is None:
        return [1]
    try:
        counts = [int(n) for n in args.nproc.split(",")]
    except ValueError:
        raise ValueError(f"--nproc takes comma-separated rank counts, e.g. 1,2,4,8, got {args.nproc!r}") from None
    if not counts or min(counts) < 1:
        raise ValueError(f"--nproc takes rank counts >= 1, got {args.nproc!r}")
    for n in counts:
        if n > 1:
            check_heads(spec.num_heads, spec.num_kv_heads, n)
    return counts


def _plan_max_len(args: argparse.Namespace, spec, dtype, profile, ranks: list[int]) -> int:
    from ..bench.capacity import eager_capacity, mosaic_capacity
    from ..memory.sizes import parse_bytes
    from ..plan.report import max_len_report

    if bool(args.budget) == bool(args.device_memory):
        raise ValueError("--max-len needs exactly one of --budget (activations) or --device-memory (weights included)")
    weights = _weight_bytes(args, spec, dtype)  # one rank's, with --tp
    if args.budget:
        budget = parse_bytes(args.budget, "--budget", 1)
    else:
        budget = (
            parse_bytes(args.device_memory, "--device-memory", 1)
            - weights
            - parse_bytes(args.memory_reserve, "--memory-reserve", 0)
        )
        if budget <= 0:
            raise ValueError(
                f"the weights alone ({gib(weights)}) and the reserve do not leave activation memory "
                f"in {args.device_memory}"
            )
    tp = {"tensor_ranks": args.tp}
    executors = {
        "eager": eager_capacity(spec, dtype, budget, args.alpha),
        "mosaic": mosaic_capacity(spec, dtype, budget, args.alpha, args.row_chunk, profile=profile, **tp),
    }
    if args.allow_recompute:
        executors["mosaic-recompute"] = mosaic_capacity(
            spec, dtype, budget, args.alpha, args.row_chunk, _chunk_groups(args), profile
        )
    if ranks != [1]:  # sequence parallel: each rank's budget, every rank's weights whole
        one = executors["mosaic"]["max_len"]
        executors["mosaic"]["ranks"] = {}
        for n in (n for n in ranks if n > 1):
            capacity = mosaic_capacity(spec, dtype, budget, args.alpha, args.row_chunk, profile=profile, ranks=n)
            if one:
                capacity["vs_ranks_times_one"] = round(capacity["max_len"] / (n * one), 3)
            executors["mosaic"]["ranks"][n] = capacity
    record = {
        "model": args.preset or str(args.model),
        "dtype": str(dtype).removeprefix("torch."),
        "weights": spec.quantization.name if spec.quantization else "unquantized",
        "layers": spec.num_layers,
        "weight_bytes": weights,
        "budget_bytes": budget,
        "alpha": args.alpha,
        "device": profile.describe(),
        "predicted": True,
        "context": spec.max_position_embeddings,
        "tensor_ranks": args.tp,
        "executors": executors,
    }
    eager_len = executors["eager"]["max_len"]
    if eager_len and not any(r.get("at_search_limit") for r in executors.values()):
        record["mosaic_vs_eager"] = round(executors["mosaic"]["max_len"] / eager_len, 2)
    print(json.dumps(record) if args.json else max_len_report(record))
    return 0


def _weight_bytes(args: argparse.Namespace, spec, dtype) -> int:
    """The weights as they will be held: from the shapes, or for a GGUF file as its types load."""
    from ..checkpoint import locate
    from ..gguf_file import GGUFFile, is_gguf
    from ..models.quantized import weight_bytes

    if args.model and is_gguf(located := locate(args.model)):
        if args.tp > 1:
            raise ValueError("a GGUF file is read whole: plan --tp for a safetensors checkpoint")
        return GGUFFile(located).loaded_bytes(
            spec, dtype, parse_quantization(args.quantize, args.quantize_head, args.quantize_embeddings)
        )
    return weight_bytes(spec, dtype, tensor_ranks=args.tp)


def _chunk_groups(args: argparse.Namespace) -> tuple[str, ...]:
    """The groups `mosaic plan`'s search may split."""
    from ..models.groups import EXACT_GROUPS, searchable_groups

    return searchable_groups(args.allow_recompute, None if args.allow_recompute else EXACT_GROUPS)
