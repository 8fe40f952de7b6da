"""Masked-diffusion pre-training of a LLaDA-architecture model (the LLaDA objective), on the CPU.

Loss (LLaDA, eq. 3): draw t ~ U(0, 1) per sequence, mask each token with probability
p = (1 - eps) t + eps, and average the cross-entropy of the masked tokens weighted by 1 / p over all
B x L positions. The network is `models.transformer` run by the eager executor, so the weights we
train are exactly the ones the engine later loads. State (weights, AdamW moments, step, RNG) is
saved in safetensors + JSON, so a run resumes where it stopped; nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .. import checkpoint
from ..kernels.eager import EagerOps
from ..models import transformer
from ..models.packing import Packing
from ..models.spec import ArchSpec
from ..models.weights import from_state_dict, random_state_dict

log = logging.getLogger(__name__)
MASK_EPS = 1e-3


@dataclass
class TrainConfig:
    steps: int = 3000
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.1
    seed: int = 0
    eval_every: int = 250
    save_every: int = 250
    init_std: float = 0.02
    bf16_autocast: bool = True  # CPU matmuls run ~2x faster in bf16; master weights stay float32


def masked_diffusion_loss(
    spec: ArchSpec,
    params: dict[str, torch.Tensor],
    batch: torch.Tensor,
    gen: torch.Generator,
    mask_ratio: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weighted loss for the gradient, unweighted masked-token cross-entropy sum, masked count).

    t ~ U(0, 1) per sequence, or the fixed `mask_ratio` when given.
    """
    b, length = batch.shape
    t = torch.rand(b, 1, generator=gen) if mask_ratio is None else torch.full((b, 1), mask_ratio)
    p_mask = (1 - MASK_EPS) * t + MASK_EPS
    masked = torch.rand(b, length, generator=gen) < p_mask
    noisy = torch.where(masked, torch.full_like(batch, spec.mask_token_id), batch)
    weights = from_state_dict(spec, params)
    hidden = transformer.hidden_states(EagerOps(), spec, weights, noisy.reshape(1, -1), Packing((length,) * b))
    # The LM head over the masked rows only: the loss reads nothing else (the engine's mask-only logits).
    logits = F.linear(hidden.reshape(b, length, -1)[masked], weights.lm_head)
    ce = F.cross_entropy(logits.float(), batch[masked], reduction="none")
    weighted = (ce / p_mask.expand(b, length)[masked]).sum() / (b * length)
    return weighted, ce.detach().sum(), int(masked.sum())


def sample_batch(tokens: torch.Tensor, batch_size: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, tokens.numel() - seq_len, (batch_size,), generator=gen)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


@torch.no_grad()
def evaluate(
    spec: ArchSpec,
    params: dict[str, torch.Tensor],
    tokens: torch.Tensor,
    seq_len: int,
    seed: int = 1234,
    batches: int = 8,
    batch_size: int = 32,
    mask_ratio: float | None = None,
) -> float:
    """Mean cross-entropy (nats) per masked token on held-out text, fixed seed.

    Mask ratios t ~ U(0, 1) (the training distribution: heavily masked sequences dominate and
    approach the unigram entropy), or a fixed `mask_ratio`, where context matters more.
    """
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for _ in range(batches):
        batch = sample_batch(tokens, batch_size, seq_len, gen)
        _, ce_sum, n = masked_diffusion_loss(spec, params, batch, gen, mask_ratio)
        total, count = total + float(ce_sum), count + n
    return total / max(count, 1)


def unigram_cross_entropy(train_tokens: torch.Tensor, val_tokens: torch.Tensor, vocab: int) -> float:
    """Cross-entropy of the validation tokens under add-one unigram frequencies of the training tokens."""
    counts = torch.bincount(train_tokens, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[val_tokens].mean())


class Trainer:
    def __init__(
        self, spec: ArchSpec, cfg: TrainConfig, train_tokens: torch.Tensor, val_tokens: torch.Tensor, run_dir: Path
    ):
        self.spec, self.cfg, self.run_dir = spec, cfg, Path(run_dir)
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.gen = torch.Generator().manual_seed(cfg.seed)
        init = random_state_dict(spec, torch.float32, seed=cfg.seed, std=cfg.init_std)
        self.params = {k: v.requires_grad_() for k, v in init.items()}
        decay = [p for k, p in self.params.items() if p.ndim == 2]
        no_decay = [p for k, p in self.params.items() if p.ndim < 2]
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
        )
        self.step = 0
        self.seconds = 0.0  # training time over every run that led to this state
        self.history: list[dict[str, float]] = []

    def lr_at(self, step: int) -> float:
        if step < self.cfg.warmup:
            return self.cfg.lr * (step + 1) / self.cfg.warmup
        progress = (step - self.cfg.warmup) / max(1, self.cfg.steps - self.cfg.warmup)
        return self.cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def train(self, on_step: Callable[[int, float], None] | None = None) -> None:
        resumed_at, before = time.perf_counter(), self.seconds
        while self.step < self.cfg.steps:
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.step)
            batch = sample_batch(self.train_tokens, self.cfg.batch_size, self.cfg.seq_len, self.gen)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
                loss, _, _ = masked_diffusion_loss(self.spec, self.params, batch, self.gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
            self.opt.step()
            self.step += 1
            self.seconds = before + time.perf_counter() - resumed_at
            loss = float(loss.detach())
            if on_step:
                on_step(self.step, loss)
            if self.step % self.cfg.eval_every == 0 or self.step == self.cfg.steps:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
                    val = evaluate(self.spec, self.params, self.val_tokens, self.cfg.seq_len)
                self.history.append({"step": self.step, "train_loss": loss, "val_ce": val, "seconds": self.seconds})
                log.info("step %d: train loss %.3f, validation CE %.3f", self.step, loss, val)
            if self.step % self.cfg.save_every == 0 or self.step == self.cfg.steps:
                self.save_state()

    # --- resumable state: safetensors for tensors, JSON for the rest -------------------------------
    def save_state(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"param/{k}": v.detach() for k, v in self.params.items()}
        for k, p in self.params.items():
            st = self.opt.state.get(p, {})
            for slot in ("exp_avg", "exp_avg_sq"):
                if slot in st:
                    tensors[f"{slot}/{k}"] = st[slot]
        tensors["rng"] = self.gen.get_state()
        save_file(tensors, str(self.run_dir / "state.safetensors.tmp"))
        (self.run_dir / "state.safetensors.tmp").replace(self.run_dir / "state.safetensors")
        meta = {"step": self.step, "seconds": self.seconds, "config": asdict(self.cfg), "history": self.history}
        (self.run_dir / "state.json").write_text(json.dumps(meta, indent=2))

    def load_state(self) -> bool:
        if not (self.run_dir / "state.json").exists():
            return False
        meta = json.loads((self.run_dir / "state.json").read_text())
        tensors = load_file(str(self.run_dir / "state.safetensors"))
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(tensors[f"param/{k}"])
                if f"exp_avg/{k}" in tensors:
                    self.opt.state[p] = {
                        "step": torch.tensor(float(meta["step"])),
                        "exp_avg": tensors[f"exp_avg/{k}"].clone(),
                        "exp_avg_sq": tensors[f"exp_avg_sq/{k}"].clone(),
                    }
        self.gen.set_state(tensors["rng"])
        self.step, self.seconds, self.history = meta["step"], meta["seconds"], meta["history"]
        return True

    def export(self, path: Path, dtype: torch.dtype = torch.bfloat16) -> None:
        """Write the weights as a LLaDA checkpoint (official names and config keys)."""
        state = {k: v.detach().to(dtype) for k, v in self.params.items()}
        checkpoint.save(path, self.spec, state)
