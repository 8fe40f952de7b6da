"""Recipes for the embedded default model: stdlib source -> code BPE -> small LLaDA -> shipped checkpoint.

`RECIPES["default"]` made the shipped weights (the model card says how long it took and what it
scores); `RECIPES["quick"]` runs the same code in seconds, for tests.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..config import GenerationConfig
from ..engine import LLM
from ..models.spec import ArchSpec
from . import corpus
from .bpe import save_tokenizer, train_bpe
from .trainer import DistillStage, FunctionStage, TrainConfig, Trainer, evaluate, unigram_cross_entropy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Shape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class Recipe:
    shape: Shape
    train: TrainConfig
    vocab_size: int
    max_files: int | None = None  # the first files of the sorted corpus only (quick runs)
    gen_length: int = 32  # generation_config.json: the defaults a bare `mosaic generate` uses
    block_length: int = 8


RECIPES = {
    "default": Recipe(
        Shape(hidden_size=192, num_layers=4, num_heads=3, intermediate_size=512),
        TrainConfig(
            steps=4800,
            batch_size=8,
            seq_len=1024,
            lr=3e-3,
            warmup=100,
            eval_every=400,
            save_every=100,
            function_stage=FunctionStage(steps=900),
            distill_stage=DistillStage(steps=700, certainty=2.0),
        ),
        vocab_size=4096,
    ),
    "quick": Recipe(
        Shape(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128),
        TrainConfig(
            steps=20,
            batch_size=4,
            seq_len=128,
            lr=3e-3,
            warmup=5,
            eval_every=10,
            save_every=10,
            function_stage=FunctionStage(steps=4, functions=8, window=64, files=2, warmup=1),
            distill_stage=DistillStage(steps=3, heads=8, answers=4, files=1, gen_length=16, block_length=8, warmup=1),
        ),
        vocab_size=512,
        max_files=12,
        gen_length=16,
        block_length=8,
    ),
}


def spec_for(shape: Shape, vocab_size: int, ids: dict[str, int | None], seq_len: int) -> ArchSpec:
    head_dim = shape.hidden_size // shape.num_heads
    return ArchSpec(
        family="llada",
        hidden_size=shape.hidden_size,
        num_layers=shape.num_layers,
        num_heads=shape.num_heads,
        num_kv_heads=shape.num_heads,
        head_dim=head_dim,
        intermediate_size=shape.intermediate_size,
        vocab_size=vocab_size,
        rope_theta=10000.0,
        rotary_dim=head_dim,
        rms_norm_eps=1e-5,
        rope_full_precision=True,
        max_position_embeddings=seq_len,
        mask_token_id=ids["mask"],
        eos_token_ids=(ids["eos"],),
        pad_token_id=ids["eos"],
    )


def tokenize(tok, texts: list[str], eos: int) -> torch.Tensor:
    """Documents one after another, each closed by EOS (training windows may cross a boundary)."""
    ids: list[int] = []
    for enc in tok.encode_batch(texts):
        ids += enc.ids + [eos]
    return torch.tensor(ids, dtype=torch.long)


def function_samples(tok, texts: list[str], eos: int, window: int) -> torch.Tensor:
    """One row per function of `texts` that fits `window` with an EOS after it (8 tokens at least),
    padded with EOS to `window`: LLaDA's SFT padding, so the model learns to end."""
    rows = []
    for enc in tok.encode_batch([fn for text in texts for fn in corpus.functions(text)]):
        if 8 <= len(enc.ids) < window:
            rows.append(enc.ids + [eos] * (window - len(enc.ids)))
    return torch.tensor(rows, dtype=torch.long).reshape(-1, window)


def self_answers(
    trainer: Trainer, tok, texts: list[str], stage: DistillStage, run_dir: Path, seed: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The distillation stage's targets: the model's own greedy answers (the official sampler, run
    by the engine on the model as it stands, exported as shipped) to `stage.heads` training-function
    heads, drawn with `seed`. Kept in the run directory, so a resumed run reads them back."""
    path = run_dir / "answers.safetensors"
    if not path.exists():
        teacher = run_dir / "teacher"
        trainer.export(teacher)
        ids = save_tokenizer(teacher, tok, "llada", chat=False)
        write_generation_config(teacher, ids, stage.gen_length, stage.block_length)
        heads = [head for text in texts for head in corpus.function_heads(text)]
        random.Random(seed).shuffle(heads)
        cfg = GenerationConfig(gen_length=stage.gen_length, steps=stage.gen_length, block_length=stage.block_length)
        outs = LLM(teacher, max_batch=16).generate(heads[: stage.heads], cfg)
        tensors = {
            "prompts": torch.tensor([t for o in outs for t in o.prompt_token_ids]),
            "prompt_lengths": torch.tensor([len(o.prompt_token_ids) for o in outs]),
            "answers": torch.tensor([o.token_ids for o in outs]),
        }
        save_file(tensors, str(run_dir / "answers.safetensors.tmp"))
        (run_dir / "answers.safetensors.tmp").replace(path)
    tensors = load_file(str(path))
    return list(zip(tensors["prompts"].split(tensors["prompt_lengths"].tolist()), tensors["answers"], strict=True))


def write_generation_config(out: Path, ids: dict[str, int | None], gen_length: int, block_length: int) -> None:
    """generation_config.json: the special ids and the defaults a bare `mosaic generate` uses."""
    generation = {
        "mask_token_id": ids["mask"],
        "eos_token_id": ids["eos"],
        "steps": gen_length,
        "gen_length": gen_length,
        "block_length": block_length,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")


def plot_losses(history: list[dict[str, float]], path: Path, cfg: TrainConfig) -> None:
    """The loss curve: training loss and held-out masked-token cross-entropy against the step, a
    line where each later stage starts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], label="training loss (the stage's objective)", lw=1)
    ax.plot(steps, [h["val_ce"] for h in history], "o-", label="held-out masked-token CE (nats)", ms=3)
    for (step, stage), style in zip(cfg.stages()[1:], (":", "--"), strict=False):
        ax.axvline(step, color="grey", ls=style, label=f"{stage.label} from here")
    ax.set(xlabel="step", ylabel="nats", title="default model: masked-diffusion training")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def train_default_model(out: Path, run_dir: Path, recipe: Recipe, progress: bool = True) -> dict:
    """Train (or resume) `recipe` and export the checkpoint to `out`; returns the model card's figures."""
    started = time.time()
    cfg = recipe.train
    source = corpus.build(max_files=recipe.max_files)
    train_texts, val_texts = source.texts(source.train), source.texts(source.held_out)
    tok = train_bpe(train_texts, "llada", recipe.vocab_size, code=True)
    ids = save_tokenizer(out, tok, "llada", chat=False)  # trained on code, never on chats
    train_tokens = tokenize(tok, train_texts, ids["eos"])
    val_tokens = tokenize(tok, val_texts, ids["eos"])
    window = cfg.function_stage.window if cfg.function_stage else None
    train_functions = function_samples(tok, train_texts, ids["eos"], window) if window else None
    val_functions = function_samples(tok, val_texts, ids["eos"], window) if window else None
    seq_len = min(cfg.seq_len, val_tokens.numel() - 1)
    cfg = replace(cfg, seq_len=seq_len)
    spec = spec_for(recipe.shape, recipe.vocab_size, ids, seq_len)
    trainer = Trainer(spec, cfg, train_tokens, val_tokens, run_dir, train_functions)
    if trainer.load_state():
        log.info("resumed from %s at step %d", run_dir, trainer.step)
    bar = tqdm(total=cfg.total_steps, initial=trainer.step, desc="training", unit="step", disable=not progress)

    def on_step(step: int, loss: float) -> None:
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}")

    if cfg.distill_stage:
        start = cfg.stages()[-1][0]
        trainer.train(on_step, until=start)
        trainer.answers = self_answers(trainer, tok, train_texts, cfg.distill_stage, Path(run_dir), cfg.seed)
    trainer.train(on_step)
    bar.close()
    trainer.export(out)
    plot_losses(trainer.history, out / "loss_curve.png", cfg)
    val_ce = evaluate(spec, trainer.params, val_tokens, cfg.seq_len)
    figures = {
        "corpus": source.describe() | {"train_tokens": train_tokens.numel(), "held_out_tokens": val_tokens.numel()},
        "held_out_masked_token_ce_nats": round(val_ce, 4),
    }
    if val_functions is not None and len(val_functions):
        figures["functions"] = {"train": len(train_functions), "held_out": len(val_functions)}
        figures["held_out_function_ce_nats"] = round(evaluate(spec, trainer.params, val_functions, window), 4)
    figures |= {
        "unigram_baseline_ce_nats": round(unigram_cross_entropy(train_tokens, val_tokens, recipe.vocab_size), 4),
        "parameters": sum(p.numel() for p in trainer.params.values()),
        "recipe": asdict(recipe),
        "history": trainer.history,
        "train_seconds": round(trainer.seconds, 1),
        "wall_seconds_this_run": round(time.time() - started, 1),
    }
    (out / "training.json").write_text(json.dumps(figures, indent=2) + "\n")
    write_generation_config(out, ids, recipe.gen_length, recipe.block_length)
    return figures
