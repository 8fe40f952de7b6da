"""`mosaic generate | serve | info | train | device | eval`: arguments to the engine, nothing else."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from dataclasses import replace
from pathlib import Path

from ..config import SETTINGS
from ..engine import DEFAULT_MAX_BATCH
from ..memory.sizes import mib
from ..runtime import PARALLEL, PLANNED


def generate(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..engine import default_model_path

    if args.nproc and "RANK" not in os.environ:  # this process launches the ranks, then waits for them
        return launch_ranks(args, sys.argv[1:])
    lead = join_ranks(args)
    if not lead:  # another rank: run the same steps in lockstep, print nothing
        args.no_progress, args.json = True, False
    model = args.model or default_model_path()
    llm = load_engine(args, model)
    cfg = llm.default_config(**{k: getattr(args, k) for k in SETTINGS})
    llm.resolve(cfg)  # fail on bad settings before encoding or printing anything
    prompt_ids = llm.encode(args.prompt, chat=args.chat)
    cfg_resolved = llm.resolve(cfg, len(prompt_ids))
    if args.model is None:
        print(
            f"[default model: {Path(model).name}, a {llm.spec.num_layers}-layer LLaDA trained by `mosaic train` "
            "on the standard library's Python source: a demo of the engine, not an assistant]",
            file=sys.stderr,
        )
    bar = tqdm(total=cfg_resolved.most_steps, desc="denoising", unit="step", disable=args.no_progress, file=sys.stderr)

    def on_step(event) -> None:
        if bar.total != event.total_steps:  # the sampler's count (block diffusion: per block)
            bar.total = event.total_steps
        bar.update(1)
        bar.set_postfix(block=event.block, masked=int((event.canvas == event.mask_token_id).sum()))

    try:
        out = llm.generate(prompt_ids, cfg_resolved, callback=on_step)[0]
    except RuntimeError as exc:
        if (lost := lost_ranks(exc)) is None:
            raise
        raise lost from None
    bar.close()
    if not lead:
        return 0
    if args.json:
        record = {
            "model": str(model),
            "family": llm.info.family,
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


def launch_ranks(args: argparse.Namespace, argv: list[str]) -> int:
    """`--nproc N`: the same command on N processes through torch.distributed's launcher (torchrun's)."""
    if args.executor not in PARALLEL:
        raise ValueError(f"--nproc needs --executor {' or '.join(PARALLEL)}")
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    ranks_argv, skip = [], False  # the ranks run the command without --nproc (the launcher's parser would take it)
    for a in argv:
        if not skip and not a.startswith("--nproc"):
            ranks_argv.append(a)
        skip = a == "--nproc"
    try:
        torchrun(["--nproc-per-node", str(args.nproc), "--module", "mosaic_dllm.cli", *ranks_argv])
    except ChildFailedError as exc:
        raise ValueError(f"the run failed across its ranks: {failed_ranks(exc.failures)}") from None
    except SignalException as exc:  # the launcher passed the signal on to the ranks, which have stopped
        if exc.sigval in (signal.SIGTERM, signal.SIGINT):
            return 0
        raise ValueError(f"stopped by {exc.sigval.name}") from None
    return 0


def failed_ranks(failures: dict) -> str:
    """One line for the launcher's failures: which rank died how (a signal, or its exit code)."""
    said = []
    for rank, failure in sorted(failures.items()):
        how = f"was killed by {failure.signal_name()}" if failure.exitcode < 0 else f"exited with {failure.exitcode}"
        said.append(f"rank {rank} (pid {failure.pid}) {how}")
    return "; ".join(said) + " (each rank's own error, if it had one, is above)"


def lost_ranks(error: RuntimeError) -> ValueError | None:
    """A collective that failed because another rank died or hung past --rank-timeout, as one
    line; None for any other error."""
    from ..runtime.lead import collective_failure

    said = collective_failure(error)
    return None if said is None else ValueError(f"{said}: this rank stops too")


def join_ranks(args: argparse.Namespace) -> bool:
    """Under torchrun (RANK in the environment): join the process group (gloo on CPU, NCCL on CUDA,
    one GPU a rank); returns whether this process leads (rank 0 prints). Alone: True."""
    if "RANK" not in os.environ:
        if args.executor in PARALLEL:
            raise ValueError(f"--executor {args.executor} runs across ranks: add --nproc N, or start it under torchrun")
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return True
    if args.executor not in PARALLEL:
        raise ValueError(f"running as one of several ranks needs --executor {' or '.join(PARALLEL)}")
    from datetime import timedelta

    import torch.distributed as dist

    if args.device.startswith("cuda"):
        args.device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if not dist.is_initialized():
        backend = "nccl" if args.device.startswith("cuda") else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=args.rank_timeout))
    return dist.get_rank() == 0


def load_engine(args: argparse.Namespace, model):
    """The engine for `generate` and `serve`: executor options only where the executor takes them."""
    from ..engine import LLM

    options = {"row_chunk": args.row_chunk} if args.executor in PLANNED else {}
    if args.memory_budget:
        options["memory_budget"] = args.memory_budget
    return LLM(
        model,
        dtype=args.dtype,
        device=args.device,
        executor=args.executor,
        memory_reserve=args.memory_reserve,
        allow_long_context=args.allow_long_context,
        allow_special_tokens=args.allow_special_tokens,
        allow_recompute=args.allow_recompute,
        max_batch=getattr(args, "max_batch", DEFAULT_MAX_BATCH),
        quantize=args.quantize,
        quantize_head=args.quantize_head,
        quantize_embeddings=args.quantize_embeddings,
        **options,
    )


def info(args: argparse.Namespace) -> int:
    from collections import Counter

    from ..checkpoint import locate, read_spec, shard_files, tensor_summary
    from ..engine import default_model_path
    from ..gguf_file import GGUFFile, is_gguf

    path = args.path or default_model_path()
    spec, tokenizer, _, _ = read_spec(path)
    gguf = None
    if is_gguf(located := locate(path)):
        model = GGUFFile(located)
        count, nbytes = (
            sum(int(t.n_elements) for t in model.tensors.values()),
            sum(int(t.n_bytes) for t in model.tensors.values()),
        )
        dtypes, gguf = dict(Counter(t.tensor_type.name for t in model.tensors.values())), model.summary(spec)
    else:
        count, nbytes, dtypes = tensor_summary(shard_files(located))
    info = {
        "family": spec.family,
        "layers": spec.num_layers,
        "hidden_size": spec.hidden_size,
        "heads": spec.num_heads,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "ffn": spec.intermediate_size if spec.moe is None else None,
        "moe": None if spec.moe is None else vars(spec.moe) | {"moe_layers": sum(spec.moe.moe_layers)},
        "block_size": spec.block_size or None,  # block diffusion: its attention's default blocks
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
    if gguf:
        info["gguf"] = gguf
    if args.json:
        print(json.dumps(info))
    else:
        width = max(map(len, info))
        for key, value in info.items():
            print(f"{key:<{width}}  {value}")
    return 0


def train(args: argparse.Namespace) -> int:
    from ..train.default_model import RECIPES, train_default_model

    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise ValueError(f"{out} exists and is not empty; choose a fresh --out or pass --overwrite")
    recipe = RECIPES["quick" if args.quick else "default"]
    overrides = {k: v for k, v in (("steps", args.steps), ("seed", args.seed)) if v is not None}
    recipe = replace(recipe, train=replace(recipe.train, **overrides))
    figures = train_default_model(out, Path(args.run_dir), recipe)
    functions = figures.get("held_out_function_ce_nats")
    print(
        f"held-out CE {figures['held_out_masked_token_ce_nats']:.3f} nats/masked token "
        f"(unigram baseline {figures['unigram_baseline_ce_nats']:.3f}"
        + (f"; whole EOS-padded functions {functions:.3f}" if functions is not None else "")
        + f"), {figures['train_seconds']:.0f} s of training; "
        f"checkpoint in {out}, loss curve in {out / 'loss_curve.png'}"
    )
    return 0


def serve(args: argparse.Namespace) -> int:
    from ..engine import default_model_path
    from ..memory.sizes import parse_bytes
    from ..scheduler import Scheduler
    from ..server import create_app
    from ..server.run import serve as run_server

    if args.executor in PARALLEL and args.executor not in PLANNED:
        served = " or ".join(e for e in PARALLEL if e in PLANNED)
        raise ValueError(f"mosaic serve runs across ranks with --executor {served}, not {args.executor}")
    max_body = parse_bytes(args.max_body, "--max-body", 1024)  # bad flags fail before anything loads
    Scheduler.check_max_batch(args.max_batch)
    if args.nproc and "RANK" not in os.environ:  # this process launches the ranks, then waits for them
        _check_port_free(args.host, args.port)
        return launch_ranks(args, sys.argv[1:])
    lead = join_ranks(args)
    if lead:
        _check_port_free(args.host, args.port)  # before minutes of loading
    model = args.model or default_model_path()
    llm = load_engine(args, model)
    if not lead:  # rank 1.. follow rank 0's steps until it says stop (a signal stops rank 0, which tells them)
        from ..runtime.lead import follow

        for stop in (signal.SIGTERM, signal.SIGINT):
            signal.signal(stop, signal.SIG_IGN)
        follow(llm.executor)
        return 0
    if args.executor in PARALLEL:
        llm.lead_ranks()
    app = create_app(
        llm,
        model_name=args.served_model_name,
        max_queue=args.max_queue,
        max_body_bytes=max_body,
        body_seconds=args.body_timeout,
    )
    budget = llm.info.memory_budget
    limits = f"batch {args.max_batch}, queue {args.max_queue}"
    print(
        f"mosaic serve: {Path(model).name} ({llm.info.family}, {llm.info.executor} executor, memory budget "
        f"{mib(budget) if budget else 'none'}, {limits}) on http://{args.host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    try:
        run_server(
            app,
            args.host,
            args.port,
            log_level="debug" if args.verbose else "info",
            header_timeout=args.header_timeout,
            max_connections=args.max_connections,
        )
    finally:
        if llm.lead is not None:
            llm.lead.stop()  # the other ranks return
    return 0


def _check_port_free(host: str, port: int) -> None:
    import socket

    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def device(args: argparse.Namespace) -> int:
    """Print (or write as JSON) the device profile: measured now, or read from the cache."""
    import time

    import torch

    from ..device import profile_for, profile_report

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


def evaluate(args: argparse.Namespace) -> int:
    try:
        from ..evaluation import main as evaluate
    except ImportError as exc:
        raise ValueError(f"mosaic eval needs lm-eval: pip install 'mosaic-dllm[eval]' ({exc})") from None
    rest = args.lm_eval_args
    return evaluate(rest[1:] if rest[:1] == ["--"] else rest)
