"""`mosaic` command line: arguments to configs to the engine, nothing else."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from .train.default_model import train_default_model
    from .train.trainer import TrainConfig

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr, seed=args.seed)
    figures = train_default_model(Path(args.out), Path(args.run_dir), cfg, vocab_size=args.vocab_size)
    print(f"validation CE {figures['validation_masked_token_ce_nats']:.3f} nats/masked token "
          f"(unigram baseline {figures['unigram_baseline_ce_nats']:.3f}); checkpoint in {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mosaic", description="Memory-efficient diffusion LLM inference")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what the engine does")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train the small default LLaDA model on stdlib docstrings (CPU)")
    p.add_argument("--out", default="mosaic_dllm/assets/default_model", help="checkpoint directory to write")
    p.add_argument("--run-dir", default="runs/default_model", help="resumable training state")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
