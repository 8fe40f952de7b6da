"""`mosaic` command line: arguments to configs to the engine, nothing else."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import FAMILY_NAMES, SETTINGS, Setting
from .engine import DEFAULT_MAX_BATCH, USER_ERRORS
from .memory.sizes import gib, mib
from .runtime import DEFAULT_ROW_CHUNK


def _generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .engine import default_model_path

    model = args.model or default_model_path()
    llm = _load(args, model)
    cfg = llm.default_config(**{k: getattr(args, k) for k in SETTINGS})
    llm.resolve(cfg)  # fail on bad settings before encoding or printing anything
    prompt_ids = llm.encode(args.prompt, chat=args.chat)
    cfg_resolved = llm.resolve(cfg, len(prompt_ids))
    if args.model is None:
        print(
            f"[default model: {Path(model).name}, a {llm.spec.num_layers}-layer LLaDA trained "
            f"by `mosaic train` on stdlib docstring summaries: short, docstring-like sentences]",
            file=sys.stderr,
        )
    bar = tqdm(total=cfg_resolved.most_steps, desc="denoising", unit="step", disable=args.no_progress, file=sys.stderr)

    def on_step(event) -> None:
        bar.update(1)
        bar.set_postfix(block=event.block, masked=int((event.canvas == event.mask_token_id).sum()))

    out = llm.generate(prompt_ids, cfg_resolved, callback=on_step)[0]
    bar.close()
    if args.json:
        record = {
            "model": str(model),
            "family": llm.spec.family,
            "executor": args.executor,
            **vars(out),
        }
        print(json.dumps(record))
    else:
        print(out.text)
    if not args.json and not args.no_progress:
        tokens = len(out.token_ids)
        print(
            f"[{out.forward_passes} forward passes for {tokens} generated tokens "
            f"({out.forward_passes / tokens:.3g} per token), {out.seconds:.2f} s]",
            file=sys.stderr,
        )
    return 0


def _load(args: argparse.Namespace, model):
    """The engine for `generate` and `serve`: executor options only where the executor takes them."""
    from .engine import LLM

    options = {"row_chunk": args.row_chunk} if args.executor == "mosaic" else {}
    if args.memory_budget:
        options["memory_budget"] = args.memory_budget
    return LLM(
        model,
        dtype=args.dtype,
        device=args.device,
        executor=args.executor,
        memory_reserve=args.memory_reserve,
        allow_long_context=getattr(args, "allow_long_context", False),
        allow_recompute=args.allow_recompute,
        max_batch=getattr(args, "max_batch", DEFAULT_MAX_BATCH),
        **options,
    )


def _info(args: argparse.Namespace) -> int:
    from .checkpoint import read_spec, shard_files, tensor_summary

    spec, tokenizer, _, _ = read_spec(args.path)
    count, nbytes, dtypes = tensor_summary(shard_files(Path(args.path)))
    info = {
        "family": spec.family,
        "layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "heads": spec.num_heads,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "ffn": spec.intermediate_size if spec.moe is None else None,
        "moe": None if spec.moe is None else vars(spec.moe) | {"moe_layers": sum(spec.moe.moe_layers)},
        "vocab_size": spec.vocab_size,
        "tokenizer_vocab": tokenizer.vocab_size if tokenizer else None,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.max_position_embeddings,
        "mask_token_id": spec.mask_token_id,
        "eos_token_ids": list(spec.eos_token_ids),
        "pad_token_id": spec.pad_token_id,
        "parameters": count,
        "weight_bytes": nbytes,
        "stored_dtypes": dtypes,
    }
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from .train.default_model import train_default_model
    from .train.trainer import TrainConfig

    for flag in ("steps", "batch_size", "seq_len", "vocab_size"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out} exists and is not empty; choose a fresh --out or pass --overwrite")
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    figures = train_default_model(Path(args.out), Path(args.run_dir), cfg, vocab_size=args.vocab_size)
    print(
        f"validation CE {figures['validation_masked_token_ce_nats']:.3f} nats/masked token "
        f"(unigram baseline {figures['unigram_baseline_ce_nats']:.3f}); checkpoint in {args.out}"
    )
    return 0


def _bench_base(args: argparse.Namespace, budget: int | None = None) -> tuple[dict, list[str], dict[str, dict]]:
    from .bench.variants import variant_options

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
        "generation": generation,
    }
    return job, executors, options


def _bench_memory(args: argparse.Namespace) -> int:
    from .bench.runner import memory_records, memory_table
    from .memory.sizes import parse_bytes

    job, executors, options = _bench_base(args, parse_bytes(args.budget) if args.budget else None)
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
        from .bench.plot import plot_memory

        name = args.preset or Path(args.model).name
        plot_memory(
            records, timelines, args.plot, f"{name}, {args.layers or 'all'} layers, {args.dtype}, alpha {args.alpha}"
        )
    return _report_failures(failed)


def _failed_probes(records: list[dict]) -> list[str]:
    """Probes that failed for another reason than "does not fit" (that one is a result)."""
    return [
        f"{r['executor']} at L={r['length']}: {r['status']}"
        for r in records
        if r["status"] != "ok" and not r["status"].startswith("does not fit")
    ]


def _report_failures(failed: list[str]) -> int:
    for line in failed:
        print(f"error: probe failed: {line}", file=sys.stderr)
    return 1 if failed else 0


def _bench_max_len(args: argparse.Namespace) -> int:
    from .bench.runner import max_len_records
    from .memory.sizes import parse_bytes

    budget = parse_bytes(args.budget)
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


def _plan(args: argparse.Namespace) -> int:
    """Plan one first denoising step from the config alone: no weights are read, nothing heavy runs."""
    from . import checkpoint
    from .bench.capacity import first_step_shape
    from .bench.presets import preset
    from .plan.compute import recompute_cost
    from .plan.offsets import ascii_map
    from .plan.step_plan import PlanCache

    if bool(args.preset) == bool(args.model):
        raise ValueError("give exactly one of --preset NAME or --model PATH")
    spec = preset(args.preset, args.layers) if args.preset else checkpoint.read_spec(args.model)[0]
    dtype = checkpoint.parse_dtype(args.dtype) or checkpoint.parse_dtype(spec.torch_dtype) or checkpoint.DTYPES["bf16"]
    profile = _device_profile(args)
    if args.max_len:
        return _plan_max_len(args, spec, dtype, profile)
    if args.length is None:
        raise ValueError("give --length L (or --max-len with --budget or --device-memory)")
    if args.length < 2:
        raise ValueError(f"--length must be at least 2, got {args.length}")
    shape = first_step_shape(spec, dtype, args.length, args.alpha, args.row_chunk, args.cfg_scale, args.rows)
    if args.cache != "none":  # the request's block cache, alive through its steps (models/kv_cache.py)
        from dataclasses import replace

        from .decoding.parallel import cache_positions
        from .models.kv_cache import BlockCache

        positions = cache_positions(args.length, args.block_length, args.cache)
        if positions < 1:
            raise ValueError(f"--block-length ({args.block_length}) must be shorter than --length ({args.length})")
        shape = replace(shape, cache_bytes=BlockCache(spec, positions).nbytes(dtype))
    sampler = shape.sampler_row_bytes
    plans = PlanCache(spec, dtype, profile=profile)
    summary = {
        "model": args.preset or str(args.model),
        "dtype": str(dtype).removeprefix("torch."),
        "device": profile.describe(),
    }
    if args.max_batch:
        return _plan_max_batch(args, summary, shape, plans)
    if args.budget:  # the lazy search's choice for this budget (DoesNotFit names the floor)
        from .memory.sizes import parse_bytes
        from .plan.search import fit

        budget = parse_bytes(args.budget)
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
    mb = mib
    print(f"{summary['model']} ({spec.num_layers} layers, {summary['dtype']}), batch {shape.batch}, L={args.length}")
    print(f"  device           {summary['device']}")
    print(
        f"  arena            {mb(plan.arena_bytes)} ({plan.plan.algorithm}; lower bound {mb(plan.lower_bound_bytes)},"
        f" ratio {summary['arena_vs_lower_bound']})"
    )
    print(
        f"  workspace        {mb(plan.workspace_bytes)} at most outside the arena at once (attention kernel "
        f"output, MoE routing and experts, the sampler's {sampler} bytes per logits row at temperature 0)"
    )
    if shape.cache_bytes:
        print(f"  block cache      {mb(shape.cache_bytes)} ({args.cache}), alive across steps outside the arena")
    print(f"  predicted peak   {mb(plan.predicted_peak_bytes)} of activations (arena + workspace + cache)")
    print(f"  peak at          {summary['peak_op']} ({summary['peak_group']})")
    print(f"  chunks           {summary['chunks']}; {summary['planned_layers']}; {summary['buffers']} buffers")
    if cost.passes > 1:
        print(
            f"  recompute        K and V computed {cost.passes} times per layer (one per query block): "
            f"+{cost.extra_fraction:.1%} multiply-adds; logits within a tolerance of the exact ones"
        )
    else:
        print("  attention        exact (bit-identical to eager)")
    print(f"  planned in       {plan.planning_seconds * 1000:.1f} ms")
    if search:
        print(
            f"  search           fits {mb(search['budget_bytes'])}: {search['plans_tried']} plans tried in "
            f"{search['search_seconds'] * 1000:.1f} ms"
        )
    if args.ascii:
        print(ascii_map(plan.buffers, plan.plan))
    return 0


def _plan_max_batch(args: argparse.Namespace, summary: dict, shape, plans) -> int:
    """The most requests like this one (their first, largest step) one batched step can run within
    the budget: what the scheduler's admission would let in together."""
    from dataclasses import replace

    from .memory.sizes import parse_bytes
    from .plan.search import DoesNotFit, fit, longest

    if not args.budget:
        raise ValueError("--max-batch needs --budget (the activation memory a step may use)")
    budget = parse_bytes(args.budget)
    chosen = {}

    def fits(n: int) -> bool:
        try:
            many = replace(shape, lengths=shape.lengths * n, cache_bytes=shape.cache_bytes * n)
            chosen[n] = fit(plans, many, budget, _chunk_groups(args), explain=False).plan
        except DoesNotFit:
            return False
        return True

    most = longest(fits, start=1, limit=1 << 16).max_len
    record = summary | {"length": args.length, "budget_bytes": budget, "max_batch": most}
    if most:
        plan = chosen[most]
        record |= {"predicted_peak_activation_bytes": plan.predicted_peak_bytes, "chunks": plan.summary()["chunks"]}
    if args.json:
        print(json.dumps(record))
        return 0
    head = f"{record['model']} ({record['dtype']}), L={args.length}, budget {mib(budget)}"
    print(f"{head}: at most {most} requests per step")
    if most:
        print(f"  predicted peak {mib(record['predicted_peak_activation_bytes'])}, chunks {record['chunks']}")
    return 0


def _device_profile(args: argparse.Namespace):
    """The device a plan is for: another machine's saved profile (--profile), else this one's --device."""
    import torch

    from .device import DeviceProfile, profile_for

    if args.profile:
        return DeviceProfile.load(args.profile)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here (plan for one with --profile FILE)")
    return profile_for(args.device)


def _device(args: argparse.Namespace) -> int:
    """Print (or write as JSON) the device profile: measured now, or read from the cache."""
    import time

    import torch

    from .device import profile_for, profile_report

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA device here")
    start = time.perf_counter()
    profile = profile_for(args.device)
    cached = dict(profile.data["seconds"])
    profile.probe_all()
    seconds = time.perf_counter() - start
    probed = {k: v for k, v in profile.data["seconds"].items() if k not in cached}
    record = profile.data | {"path": str(profile.path), "seconds_now": round(seconds, 4), "probed_now": len(probed)}
    if args.json:
        print(json.dumps(record, sort_keys=True))
        return 0
    print(profile_report(profile, seconds, measured=bool(probed)))
    return 0


def _plan_max_len(args: argparse.Namespace, spec, dtype, profile) -> int:
    from .bench.capacity import eager_capacity, mosaic_capacity, weight_bytes
    from .memory.sizes import parse_bytes

    if bool(args.budget) == bool(args.device_memory):
        raise ValueError("--max-len needs exactly one of --budget (activations) or --device-memory (weights included)")
    weights = weight_bytes(spec, dtype)
    if args.budget:
        budget = parse_bytes(args.budget)
    else:
        budget = parse_bytes(args.device_memory) - weights - parse_bytes(args.memory_reserve)
        if budget <= 0:
            raise ValueError(
                f"the weights alone ({gib(weights)}) and the reserve do not leave activation memory "
                f"in {args.device_memory}"
            )
    executors = {
        "eager": eager_capacity(spec, dtype, budget, args.alpha),
        "mosaic": mosaic_capacity(spec, dtype, budget, args.alpha, args.row_chunk, profile=profile),
    }
    if args.allow_recompute:
        executors["mosaic-recompute"] = mosaic_capacity(
            spec, dtype, budget, args.alpha, args.row_chunk, _chunk_groups(args), profile
        )
    record = {
        "model": args.preset or str(args.model),
        "dtype": str(dtype).removeprefix("torch."),
        "layers": spec.num_layers,
        "weight_bytes": weights,
        "budget_bytes": budget,
        "alpha": args.alpha,
        "device": profile.describe(),
        "predicted": True,
        "executors": executors,
    }
    eager_len = executors["eager"]["max_len"]
    if eager_len:
        record["mosaic_vs_eager"] = round(executors["mosaic"]["max_len"] / eager_len, 2)
    if args.json:
        print(json.dumps(record))
        return 0
    print(
        f"{record['model']} ({spec.num_layers} layers, {record['dtype']}), activation budget "
        f"{gib(budget)} (predicted from shapes, no weights loaded)"
    )
    for name, r in executors.items():
        extra = f"  chunks {r['chunks']}" if r.get("chunks") else f"  ({r['note']})" if r.get("note") else ""
        print(f"  {name:<7} max length {r['max_len'] if r['max_len'] is not None else 'n/a'}{extra}")
    if "mosaic_vs_eager" in record:
        print(f"  mosaic / eager: {record['mosaic_vs_eager']}x")
    return 0


def _serve(args: argparse.Namespace) -> int:
    from .engine import default_model_path
    from .memory.sizes import parse_bytes
    from .scheduler import Scheduler
    from .server import create_app
    from .server.run import serve

    max_body = parse_bytes(args.max_body)  # bad flags fail before anything loads
    Scheduler.check_max_batch(args.max_batch)
    if args.max_queue < 0:
        raise ValueError(f"--max-queue must be >= 0, got {args.max_queue}")
    if max_body < 1024:
        raise ValueError(f"--max-body must be at least 1KiB, got {args.max_body}")
    _check_port_free(args.host, args.port)  # before minutes of loading
    model = args.model or default_model_path()
    llm = _load(args, model)
    app = create_app(llm, model_name=args.served_model_name, max_queue=args.max_queue, max_body_bytes=max_body)
    budget = llm.executor.memory_budget
    limits = f"batch {args.max_batch}, queue {args.max_queue}"
    print(
        f"mosaic serve: {Path(model).name} ({llm.spec.family}, {llm.executor.name} executor, memory budget "
        f"{mib(budget) if budget else 'none'}, {limits}) on http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    serve(
        app,
        args.host,
        args.port,
        log_level="debug" if args.verbose else "info",
        header_timeout=args.header_timeout,
        max_connections=args.max_connections,
    )
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    if not 0 <= port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {port}")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _add_row_chunk_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--row-chunk", type=int, default=DEFAULT_ROW_CHUNK, help="mosaic: LM-head rows per chunk")


def _add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="llada-8b, dream-7b or llada-moe-7b (random weights, real dimensions)")
    p.add_argument("--model", help="a checkpoint directory instead of a preset")
    p.add_argument("--layers", type=int, help="keep only this many layers (presets)")
    p.add_argument("--alpha", type=float, default=0.5, help="prompt fraction of the total length")
    p.add_argument(
        "--executors",
        default="eager,mosaic",
        help="comma-separated: eager, mask-only, planned, chunk-ffn-logits, mosaic, mosaic-recompute "
        "(see bench/variants.py)",
    )
    _add_row_chunk_flag(p)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the records to this file")


def _add_recompute_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-recompute",
        action="store_true",
        help="below the exact memory floor, recompute keys and values per query block (mosaic; more compute, "
        "logits within a tolerance of the exact ones)",
    )


def _chunk_groups(args: argparse.Namespace) -> tuple[str, ...]:
    """The groups `mosaic plan`'s search may split."""
    from .models.groups import EXACT_GROUPS, searchable_groups

    return searchable_groups(args.allow_recompute, None if args.allow_recompute else EXACT_GROUPS)


def _add_generation_flags(p: argparse.ArgumentParser) -> None:
    """One flag per generation setting (config.SETTINGS), unset unless given."""
    g = p.add_argument_group("generation (unset flags take the checkpoint's generation_config.json, then defaults)")
    for s in SETTINGS.values():
        if s.kind is bool:
            g.add_argument(s.flag, action="store_true", default=None, help=_flag_help(s))
        else:
            g.add_argument(s.flag, type=s.kind if not s.choices else str, choices=s.choices or None, help=_flag_help(s))


def _flag_help(s: Setting) -> str:
    readers = "" if len(s.families) == len(FAMILY_NAMES) else f" ({' / '.join(FAMILY_NAMES[f] for f in s.families)})"
    return f"{s.help}{readers}; {s.describe()}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaic", description="Memory-efficient diffusion LLM inference")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text. Without --model: the embedded default model (a 64-token context; "
        "defaults 32 tokens, 32 steps, blocks of 8; with only --gen-length, steps = the length).",
    )
    p.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--dtype", default=None, help="auto (as stored), bf16, fp16 or fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--executor",
        default="mosaic",
        choices=["mosaic", "eager"],
        help="mosaic: logits only for the rows the sampler reads; eager: the official full logits",
    )
    _add_row_chunk_flag(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar and no summary on stderr")
    p.add_argument(
        "--allow-long-context", action="store_true", help="run past the checkpoint's context (quality may degrade)"
    )
    _add_recompute_flag(p)
    _add_generation_flags(p)
    p.add_argument("--memory-budget", help="activation memory a step may use, e.g. 2GiB (mosaic)")
    p.add_argument("--memory-reserve", default="1GiB", help="kept free when the budget is derived from free memory")
    p.set_defaults(func=_generate)

    p = sub.add_parser("info", help="summarise a checkpoint without loading its weights")
    p.add_argument("path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_info)

    p = sub.add_parser(
        "eval",
        help="lm-evaluation-harness with the `mosaic` model (e.g. --model mosaic --tasks gsm8k)",
        add_help=False,
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's own arguments")
    p.set_defaults(func=_eval)

    bench = sub.add_parser("bench", help="measure memory and latency of one denoising step").add_subparsers(
        dest="bench", required=True
    )
    p = bench.add_parser("memory", help="peak, PAR, RSS growth and latency per executor and length")
    _add_bench_flags(p)
    p.add_argument("--lengths", default="512,1024,2048", help="total sequence lengths L")
    p.add_argument("--plot", help="write a PNG with the timelines and peak vs L")
    p.add_argument("--budget", help="planned executors fit each step into this budget, e.g. 2GiB (default: none)")
    p.set_defaults(func=_bench_memory)
    p = bench.add_parser("max-len", help="longest sequence whose step fits an activation budget")
    _add_bench_flags(p)
    p.add_argument("--budget", default="4GiB", help="activation memory budget, e.g. 2GiB")
    p.add_argument("--start", type=int, default=512)
    p.add_argument("--step", type=int, default=512)
    p.add_argument("--limit", type=int, default=262144, help="longest length to try")
    p.add_argument("--precision", type=int, default=64, help="binary search stops at this gap")
    p.add_argument("--measure-up-to", type=int, default=4096, help="longer lengths are predicted, not run")
    p.set_defaults(func=_bench_max_len)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    p.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--served-model-name", help="the model id clients use (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--dtype", default=None, help="auto (as stored), bf16, fp16 or fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--executor", default="mosaic", choices=["mosaic", "eager"])
    _add_row_chunk_flag(p)
    p.add_argument("--memory-budget", help="activation memory, e.g. 8GiB (default: free memory minus the reserve)")
    p.add_argument("--memory-reserve", default="1GiB", help="kept free when the budget is derived")
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="most requests per forward pass, as the memory plan admits (1: one at a time; tokens are the same)",
    )
    p.add_argument("--max-queue", type=int, default=64, help="admitted requests that may wait beyond the batch")
    p.add_argument(
        "--allow-long-context", action="store_true", help="run requests beyond the checkpoint's context (warned)"
    )
    _add_recompute_flag(p)
    p.add_argument("--max-body", default="2MiB", help="largest request body (larger ones get 413)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a new connection has to send a request")
    p.add_argument("--max-connections", type=int, default=512, help="connections served at once (more get 503)")
    p.set_defaults(func=_serve)

    p = sub.add_parser("plan", help="print the memory plan of a denoising step (no weights loaded)")
    p.add_argument("--preset", help="llada-8b, dream-7b or llada-moe-7b")
    p.add_argument("--model", help="a checkpoint directory (only config.json is read)")
    p.add_argument("--layers", type=int, help="keep only this many layers (presets)")
    p.add_argument("--length", type=int, help="total sequence length L (prompt + generation)")
    p.add_argument("--max-len", action="store_true", help="longest L that fits, eager vs mosaic")
    p.add_argument(
        "--max-batch", action="store_true", help="with --length and --budget: most such requests one step runs together"
    )
    p.add_argument("--budget", help="activation memory budget, e.g. 16GiB: with --length, the chunks the search picks")
    p.add_argument("--device-memory", help="--max-len: device memory, e.g. 80GiB (weights and reserve taken off)")
    p.add_argument("--memory-reserve", default="1GiB", help="--device-memory: kept free for everything else")
    p.add_argument("--alpha", type=float, default=0.5, help="prompt fraction of L (the rest is masked)")
    p.add_argument("--rows", type=int, help="rows the sampler reads (default: every masked position)")
    _add_row_chunk_flag(p)
    p.add_argument("--cfg-scale", type=float, default=0.0, help="LLaDA guidance doubles the batch")
    p.add_argument(
        "--cache",
        choices=["none", "prefix", "dual"],
        default="none",
        help="Fast-dLLM block cache the request keeps (its bytes join the plan)",
    )
    p.add_argument("--block-length", type=int, default=32, help="--cache prefix: the block the cache stops before")
    _add_recompute_flag(p)
    p.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: the config's, else bf16)")
    p.add_argument("--device", default="cpu", help="plan for this device of this machine, as its profile says")
    p.add_argument("--profile", help="plan for another machine: its saved profile (`mosaic device --json > FILE`)")
    p.add_argument("--ascii", action="store_true", help="also draw the plan (ops x arena offsets)")
    p.add_argument("--json", action="store_true", help="one JSON object")
    p.set_defaults(func=_plan)

    p = sub.add_parser("device", help="the device profile: which call sizes and blocks keep bits, measured")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="one JSON object (a file `mosaic plan --profile` reads)")
    p.set_defaults(func=_device)

    p = sub.add_parser("train", help="train the small default LLaDA model on stdlib docstrings (CPU)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (a fresh one, or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--run-dir", default="runs/default_model", help="resumable training state")
    p.add_argument("--steps", type=int, default=5000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train)
    return parser


def _eval(args: argparse.Namespace) -> int:
    try:
        from .evaluation import main as evaluate
    except ImportError as exc:
        raise ValueError(f"mosaic eval needs lm-eval: pip install 'mosaic-dllm[eval]' ({exc})") from None
    rest = args.lm_eval_args
    return evaluate(rest[1:] if rest[:1] == ["--"] else rest)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["eval"]:  # every later argument is lm_eval's, options included
        argv = ["eval", "--", *argv[1:]]
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        return args.func(args)
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
