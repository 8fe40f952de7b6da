"""Choose the default model's size: train each candidate for the same wall time, compare held-out CE.

    python benchmarks/default_model_sweep.py --seconds 240 --json benchmarks/results/default_model_sweep.json

Every candidate sees the recipe's corpus, tokenizer, context and optimiser; only the shape differs.
Equal-time short runs favour small models, so the table also gives each one's throughput: the
tokens it would see in the full budget, against ~20 tokens per parameter (compute-optimal).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from mosaic_dllm.train import corpus
from mosaic_dllm.train.bpe import train_bpe
from mosaic_dllm.train.default_model import RECIPES, Shape, spec_for, tokenize
from mosaic_dllm.train.trainer import Trainer, evaluate

CANDIDATES = [
    Shape(hidden_size=128, num_layers=4, num_heads=2, intermediate_size=352),
    Shape(hidden_size=192, num_layers=4, num_heads=3, intermediate_size=512),
    Shape(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=240, help="training time per candidate")
    parser.add_argument("--budget-minutes", type=float, default=90, help="the full run's training time")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    recipe = RECIPES["default"]
    source = corpus.build()
    tok = train_bpe(source.texts(source.train), "llada", recipe.vocab_size, code=True)
    ids = {"mask": tok.token_to_id("<|mdm_mask|>"), "eos": tok.token_to_id("<|endoftext|>")}
    train_tokens = tokenize(tok, source.texts(source.train), ids["eos"])
    val_tokens = tokenize(tok, source.texts(source.held_out), ids["eos"])
    cfg = replace(recipe.train, eval_every=10**9, save_every=10**9, steps=10**9)
    rows = []
    for shape in CANDIDATES:
        spec = spec_for(shape, recipe.vocab_size, ids, cfg.seq_len)
        trainer = Trainer(spec, cfg, train_tokens, val_tokens, Path(tempfile.mkdtemp()))
        start = time.perf_counter()

        def stop_when_due(step: int, loss: float, start: float = start, trainer: Trainer = trainer) -> None:
            if time.perf_counter() - start >= args.seconds:
                trainer.cfg = replace(trainer.cfg, steps=step)

        trainer.train(stop_when_due)
        elapsed = time.perf_counter() - start
        with torch.autocast("cpu", dtype=torch.bfloat16):
            val = evaluate(spec, trainer.params, val_tokens, cfg.seq_len, batches=4, batch_size=8)
        params = sum(p.numel() for p in trainer.params.values())
        embedding = 2 * recipe.vocab_size * shape.hidden_size
        tokens_per_s = trainer.step * cfg.batch_size * cfg.seq_len / elapsed
        rows.append(
            {
                "shape": asdict(shape),
                "parameters": params,
                "non_embedding_parameters": params - embedding,
                "steps": trainer.step,
                "tokens_per_s": round(tokens_per_s),
                "held_out_ce_nats": round(val, 4),
                "tokens_in_budget": round(tokens_per_s * args.budget_minutes * 60),
                "tokens_per_parameter_in_budget": round(tokens_per_s * args.budget_minutes * 60 / params, 1),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {"seconds_each": args.seconds, "seq_len": cfg.seq_len, "batch_size": cfg.batch_size}
        args.json.write_text(json.dumps({"settings": meta, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
