"""`mosaic` command line: arguments to configs to the engine, nothing else (commands in
`commands.py` and `planning.py`; the flags of every generation setting from config.SETTINGS)."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from ..config import FAMILY_NAMES, MAX_LENGTH, SETTINGS, Setting
from ..engine import DEFAULT_MAX_BATCH, USER_ERRORS
from ..runtime import DEFAULT_ROW_CHUNK, EXECUTORS
from . import commands, planning


def _ranged(kind: type, low: float, high: float):
    """argparse type: a `kind` in [low, high], so every numeric flag's range is declared with the
    flag (argparse names the flag in its error; nan and inf are outside any range)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {kind(low)}..{kind(high)}, got {text}")
        return value

    return parse


def _setting_range(name: str):
    """argparse type for a flag that stands for generation setting `name`: checked by the
    setting's own rule (`Setting.check`)."""
    setting = SETTINGS[name]

    def parse(text: str):
        try:
            value = setting.kind(text)
            setting.check(value)
        except ValueError as exc:  # GenerationConfigError is one
            raise argparse.ArgumentTypeError(str(exc)) from None
        return value

    return parse


_positive_int = _ranged(int, 1, MAX_LENGTH)  # counts of layers, rows, tokens
_fraction = _ranged(float, 0.0, 0.999)
_seconds = _ranged(float, 0.1, 3600)


def _add_row_chunk_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--row-chunk", type=_positive_int, default=DEFAULT_ROW_CHUNK, help="mosaic: LM-head rows per chunk")


def _add_quantize_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=["none", "int8", "int4", "int4-g32", "int4-g64", "int4-g128"],
        default=None,
        help="linear weights in int8 (per channel) or int4 (groups of 32 unless named): an approximation",
    )
    p.add_argument("--quantize-head", action="store_true", help="--quantize the LM head too")
    p.add_argument("--quantize-embeddings", action="store_true", help="--quantize: the embedding table as int8 rows")


def _add_engine_flags(p: argparse.ArgumentParser) -> None:
    """The engine's options, for the commands that load a model (generate, serve)."""
    p.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    p.add_argument("--dtype", default=None, help="auto (as stored), bf16, fp16 or fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument(
        "--executor",
        default="mosaic",
        choices=EXECUTORS,
        help="mosaic: logits only for the rows the sampler reads; eager: the official full logits; "
        "sequence-parallel: mosaic across ranks; sequence-parallel-eager, tensor-parallel: eager across ranks "
        "(--nproc or torchrun)",
    )
    _add_row_chunk_flag(p)
    p.add_argument(
        "--memory-budget", help="activation memory a step may use, e.g. 2GiB (default: free memory minus the reserve)"
    )
    p.add_argument("--memory-reserve", default="1GiB", help="kept free when the budget is derived from free memory")
    p.add_argument(
        "--allow-long-context", action="store_true", help="run past the checkpoint's context (quality may degrade)"
    )
    p.add_argument(
        "--allow-special-tokens",
        action="store_true",
        help="let prompt text carry special tokens (e.g. mask tokens to fill); refused by default",
    )
    _add_quantize_flags(p)
    _add_recompute_flag(p)


def _add_bench_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help="llada-8b, dream-7b or llada-moe-7b (random weights, real dimensions)")
    p.add_argument("--model", help="a checkpoint directory instead of a preset")
    p.add_argument("--layers", type=_positive_int, help="keep only this many layers (presets)")
    p.add_argument("--alpha", type=_fraction, default=0.5, help="prompt fraction of the total length")
    p.add_argument(
        "--executors",
        default="eager,mosaic",
        help="comma-separated: eager, mask-only, planned, chunk-ffn-logits, mosaic, mosaic-recompute "
        "(see bench/variants.py)",
    )
    _add_row_chunk_flag(p)
    p.add_argument("--temperature", type=_setting_range("temperature"), default=0.0)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", help="write the records to this file")
    _add_quantize_flags(p)


def _add_recompute_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--allow-recompute",
        action="store_true",
        help="below the exact memory floor, recompute keys and values per query block (mosaic; more compute, "
        "logits within a tolerance of the exact ones)",
    )


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


def _add_rank_flags(p: argparse.ArgumentParser) -> None:
    """Running across processes (`generate`, `serve`)."""
    p.add_argument(
        "--nproc",
        type=_positive_int,
        help="run a parallel --executor on this many processes of this machine (torch.distributed's launcher; "
        "under torchrun, its ranks are used instead); serve: --executor sequence-parallel",
    )
    p.add_argument(
        "--rank-timeout",
        type=_ranged(float, 1, 86400),
        default=300.0,
        help="across ranks: seconds a rank waits for the others at a collective before the run fails (a hung rank)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaic", description="Memory-efficient diffusion LLM inference")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "generate",
        help="generate text from a prompt",
        description="Generate text. Without --model: the embedded default model (a 1,024-token context; "
        "defaults 32 tokens, 32 steps, blocks of 8; with only --gen-length, steps = the length).",
    )
    _add_engine_flags(p)
    _add_rank_flags(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the tokenizer's chat template")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.add_argument("--no-progress", action="store_true", help="no progress bar and no summary on stderr")
    _add_generation_flags(p)
    p.set_defaults(func=commands.generate)

    p = sub.add_parser("info", help="summarise a checkpoint without loading its weights")
    p.add_argument("path", nargs="?", help="a checkpoint directory or hub id (default: the embedded default model)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.info)

    p = sub.add_parser(
        "eval",
        help="lm-evaluation-harness with the `mosaic` model (e.g. --model mosaic --tasks gsm8k)",
        add_help=False,
    )
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="lm_eval's own arguments")
    p.set_defaults(func=commands.evaluate)

    bench = sub.add_parser("bench", help="measure memory and latency of one denoising step").add_subparsers(
        dest="bench", required=True
    )
    p = bench.add_parser("memory", help="peak, PAR, RSS growth and latency per executor and length")
    _add_bench_flags(p)
    p.add_argument("--lengths", default="512,1024,2048", help="total sequence lengths L")
    p.add_argument("--plot", help="write a PNG with the timelines and peak vs L")
    p.add_argument("--budget", help="planned executors fit each step into this budget, e.g. 2GiB (default: none)")
    p.set_defaults(func=planning.bench_memory)
    p = bench.add_parser("max-len", help="longest sequence whose step fits an activation budget")
    _add_bench_flags(p)
    p.add_argument("--budget", default="4GiB", help="activation memory budget, e.g. 2GiB")
    p.add_argument("--start", type=_positive_int, default=512)
    p.add_argument("--step", type=_positive_int, default=512)
    p.add_argument("--limit", type=_positive_int, default=262144, help="longest length to try")
    p.add_argument("--precision", type=_positive_int, default=64, help="binary search stops at this gap")
    p.add_argument(
        "--measure-up-to", type=_ranged(int, 0, MAX_LENGTH), default=4096, help="longer lengths are predicted, not run"
    )
    p.set_defaults(func=planning.bench_max_len)

    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (/v1/completions, /v1/chat/completions)")
    _add_engine_flags(p)
    _add_rank_flags(p)
    p.add_argument("--served-model-name", help="the model id clients use (default: the directory name)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_ranged(int, 0, 65535), default=8000)
    p.add_argument(
        "--max-batch",
        type=int,
        default=DEFAULT_MAX_BATCH,
        help="most requests per forward pass, as the memory plan admits (1: one at a time; tokens are the same)",
    )
    p.add_argument(
        "--max-queue",
        type=_ranged(int, 0, 1 << 20),
        default=64,
        help="admitted requests that may wait beyond the batch",
    )
    p.add_argument("--max-body", default="2MiB", help="largest request body (larger ones get 413)")
    p.add_argument(
        "--header-timeout", type=_seconds, default=10.0, help="seconds a new connection has to send a request"
    )
    p.add_argument("--body-timeout", type=_seconds, default=30.0, help="seconds a request has to send its whole body")
    p.add_argument(
        "--max-connections",
        type=_ranged(int, 1, 1 << 20),
        default=512,
        help="connections served at once (more get 503)",
    )
    p.set_defaults(func=commands.serve)

    p = sub.add_parser("plan", help="print the memory plan of a denoising step (no weights loaded)")
    p.add_argument("--preset", help="llada-8b, dream-7b or llada-moe-7b")
    p.add_argument("--model", help="a checkpoint directory (only config.json is read)")
    p.add_argument("--layers", type=_positive_int, help="keep only this many layers (presets)")
    p.add_argument("--length", type=int, help="total sequence length L (prompt + generation)")
    p.add_argument("--max-len", action="store_true", help="longest L that fits, eager vs mosaic")
    p.add_argument(
        "--max-batch", action="store_true", help="with --length and --budget: most such requests one step runs together"
    )
    p.add_argument("--budget", help="activation memory budget, e.g. 16GiB: with --length, the chunks the search picks")
    p.add_argument("--device-memory", help="--max-len: device memory, e.g. 80GiB (weights and reserve taken off)")
    p.add_argument(
        "--nproc", help="sequence-parallel ranks: plan one rank's part (the budget is each rank's); --max-len: 1,2,4,8"
    )
    p.add_argument(
        "--tp",
        type=int,
        default=1,
        help="tensor-parallel ranks: plan one rank's part (1/N of each linear weight, counted by --device-memory)",
    )
    _add_quantize_flags(p)
    p.add_argument("--memory-reserve", default="1GiB", help="--device-memory: kept free for everything else")
    p.add_argument("--alpha", type=_fraction, default=0.5, help="prompt fraction of L (the rest is masked)")
    p.add_argument("--rows", type=int, help="rows the sampler reads (default: every masked position)")
    _add_row_chunk_flag(p)
    p.add_argument(
        "--cfg-scale", type=_setting_range("cfg_scale"), default=0.0, help="LLaDA guidance doubles the batch"
    )
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
    p.set_defaults(func=planning.plan)

    p = sub.add_parser("device", help="the device profile: which call sizes and blocks keep bits, measured")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--json", action="store_true", help="one JSON object (a file `mosaic plan --profile` reads)")
    p.set_defaults(func=commands.device)

    p = sub.add_parser("train", help="train the default model's recipe (LLaDA on stdlib Python source, CPU)")
    p.add_argument("--out", required=True, help="checkpoint directory to write (a fresh one, or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="write into a non-empty --out")
    p.add_argument("--run-dir", default="runs/default_model", help="resumable training state (resumes if present)")
    p.add_argument("--quick", action="store_true", help="the seconds-long recipe (a tiny model on a few files)")
    p.add_argument("--steps", type=_positive_int, help="override the recipe's optimiser steps")
    p.add_argument("--seed", type=_ranged(int, 0, 2**63 - 1), help="override the recipe's seed")
    p.set_defaults(func=commands.train)
    return parser


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
    except BrokenPipeError:  # the reader went away (`mosaic plan --json | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
