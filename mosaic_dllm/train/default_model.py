"""Recipe for the embedded default model: stdlib docstring summaries -> BPE -> small LLaDA -> shipped checkpoint."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm import tqdm

from ..models.spec import ArchSpec
from . import corpus
from .bpe import save_tokenizer, train_bpe
from .trainer import TrainConfig, Trainer, evaluate, unigram_cross_entropy

log = logging.getLogger(__name__)


def default_spec(vocab_size: int, ids: dict[str, int | None], seq_len: int) -> ArchSpec:
    return ArchSpec(
        family="llada",
        hidden_size=256,
        num_layers=3,
        num_heads=4,
        num_kv_heads=4,
        head_dim=64,
        intermediate_size=704,
        vocab_size=vocab_size,
        rope_theta=10000.0,
        rotary_dim=64,
        rms_norm_eps=1e-5,
        rope_full_precision=True,
        max_position_embeddings=seq_len,
        mask_token_id=ids["mask"],
        eos_token_ids=(ids["eos"],),
        pad_token_id=ids["eos"],
    )


def tokenize(tok, texts: list[str], eos: int) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def train_default_model(
    out: Path, run_dir: Path, cfg: TrainConfig, vocab_size: int = 2048, progress: bool = True
) -> dict:
    """Train (or resume) and export the default model to `out`; returns the figures for the model card."""
    started = time.time()
    texts = corpus.build()
    train_texts, val_texts = corpus.split(texts)
    tok = train_bpe(train_texts, "llada", vocab_size)
    ids = save_tokenizer(out, tok, "llada")
    train_tokens = tokenize(tok, train_texts, ids["eos"])
    val_tokens = tokenize(tok, val_texts, ids["eos"])
    spec = default_spec(vocab_size, ids, cfg.seq_len)
    trainer = Trainer(spec, cfg, train_tokens, val_tokens, run_dir)
    if trainer.load_state():
        log.info("resumed from %s at step %d", run_dir, trainer.step)
    bar = tqdm(total=cfg.steps, initial=trainer.step, desc="training", disable=not progress)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    trainer.train(on_step)
    bar.close()
    trainer.export(out)
    val_ce = evaluate(spec, trainer.params, val_tokens, cfg.seq_len)
    figures = {
        "corpus": {
            "source": corpus.SOURCE,
            "license": corpus.LICENSE,
            "documents": len(texts),
            "train_tokens": train_tokens.numel(),
            "val_tokens": val_tokens.numel(),
            "bytes": sum(len(t) + 1 for t in texts),
        },
        "validation_masked_token_ce_nats": round(val_ce, 4),
        "unigram_baseline_ce_nats": round(unigram_cross_entropy(train_tokens, val_tokens, vocab_size), 4),
        "parameters": sum(p.numel() for p in trainer.params.values()),
        "train_config": asdict(cfg),
        "history": trainer.history,
        "wall_seconds_this_run": round(time.time() - started, 1),
    }
    (out / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
    (out / "generation_config.json").write_text(
        json.dumps(
            {
                "mask_token_id": ids["mask"],
                "eos_token_id": ids["eos"],
                "steps": 32,
                "gen_length": 32,
                "block_length": 8,
            },
            indent=2,
        )
        + "\n"
    )
    return figures
