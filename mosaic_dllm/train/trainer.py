"""Masked-diffusion pre-training of a LLaDA-architecture model (the LLaDA objective), on the CPU.

Loss (LLaDA, eq. 3): draw t ~ U(0, 1) per sequence, mask each token with probability
p = (1 - eps) t + eps, and average the cross-entropy of the masked tokens weighted by 1 / p over all
B x L positions. Optional later stages: `FunctionStage` mixes whole functions, each followed by
EOS padding, into the batches (the shape of LLaDA's SFT data, so the model learns where code
ends); `DistillStage` distills the model into certainty on its own answers (dParallel's certainty
forcing), so threshold decoding reveals several tokens a pass. The network is
`models.transformer` run by the eager executor, so the weights we train are exactly the ones the
engine later loads.
State (weights, AdamW moments, step, RNG) is saved in safetensors + JSON, so a run resumes where
it stopped; nothing is pickled.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

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


@dataclass(frozen=True)
class FunctionStage:
    """After the first stage's steps, `steps` more whose batches hold `functions` samples of one
    whole function padded with EOS to `window` tokens, beside `files` first-stage windows (so the
    model keeps its file-level context), at a learning rate warmed to `lr` and cosine to 10%."""

    label: ClassVar[str] = "function stage (EOS-padded functions)"
    steps: int
    functions: int = 32
    window: int = 128
    files: int = 4
    lr: float = 1e-3
    warmup: int = 20


@dataclass(frozen=True)
class DistillStage:
    """Certainty-forcing self-distillation (dParallel, Chen et al. 2025, restated): the model's own
    greedy answers (official sampler, `gen_length` tokens in blocks of `block_length`) to `heads`
    training-function heads become targets. A sample keeps its prompt and the blocks before a
    random block clean, masks that block's tokens with probability t ~ U(0, 1) and every later
    block whole; the loss is the cross-entropy of that block's masked tokens plus `certainty` times
    the entropy of those it predicts right, so the model learns to be sure, in parallel, of what it
    would write anyway. `answers` samples a batch, beside `files` first-stage windows (their usual
    loss) that keep the file-level likelihood."""

    label: ClassVar[str] = "self-distillation"
    steps: int
    heads: int = 2048
    answers: int = 32
    files: int = 4
    gen_length: int = 64
    block_length: int = 32
    certainty: float = 1.0
    lr: float = 1e-3
    warmup: int = 20


Stage = FunctionStage | DistillStage


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
    function_stage: FunctionStage | None = None
    distill_stage: DistillStage | None = None

    def stages(self) -> list[tuple[int, Stage | None]]:
        """(first step, stage) in order; the first stage (file windows) is None."""
        out: list[tuple[int, Stage | None]] = [(0, None)]
        start = self.steps
        for stage in (self.function_stage, self.distill_stage):
            if stage is not None:
                out.append((start, stage))
                start += stage.steps
        return out

    @property
    def total_steps(self) -> int:
        start, stage = self.stages()[-1]
        return start + (stage.steps if stage else self.steps)

    def stage_at(self, step: int) -> tuple[int, Stage | None]:
        return [(start, stage) for start, stage in self.stages() if start <= step][-1]


def masked_diffusion_loss(
    spec: ArchSpec,
    params: dict[str, torch.Tensor],
    batch: torch.Tensor | list[torch.Tensor],
    gen: torch.Generator,
    mask_ratio: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(weighted loss for the gradient, unweighted masked-token cross-entropy sum, masked count).

    `batch`: sequences (rows of a tensor, or of different lengths), packed into one call; t ~ U(0, 1)
    per sequence, or the fixed `mask_ratio` when given.
    """
    rows = list(batch)
    lengths = torch.tensor([r.numel() for r in rows])
    tokens = torch.cat(rows)
    t = torch.rand(len(rows), generator=gen) if mask_ratio is None else torch.full((len(rows),), mask_ratio)
    p_mask = ((1 - MASK_EPS) * t + MASK_EPS).repeat_interleave(lengths)
    masked = torch.rand(tokens.numel(), generator=gen) < p_mask
    noisy = torch.where(masked, torch.full_like(tokens, spec.mask_token_id), tokens)
    weights = from_state_dict(spec, params)
    hidden = transformer.hidden_states(EagerOps(), spec, weights, noisy[None], Packing(tuple(lengths.tolist())))
    # The LM head over the masked rows only: the loss reads nothing else (the engine's mask-only logits).
    logits = F.linear(hidden.reshape(tokens.numel(), -1)[masked], weights.lm_head)
    ce = F.cross_entropy(logits.float(), tokens[masked], reduction="none")
    weighted = (ce / p_mask[masked]).sum() / tokens.numel()
    return weighted, ce.detach().sum(), int(masked.sum())


def semi_autoregressive_mask(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], block: int, mask_id: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(noisy tokens packed, which of them the loss reads, each sample's length) for (prompt,
    answer) pairs: per pair a block n of the answer, the prompt and blocks before n clean, block n's
    tokens masked with probability t ~ U(0, 1), the blocks after n masked whole."""
    noisy, targets = [], []
    for prompt, answer in pairs:
        blocks = answer.numel() // block
        n = int(torch.randint(0, blocks, (1,), generator=gen))
        t = (1 - MASK_EPS) * float(torch.rand(1, generator=gen)) + MASK_EPS
        active = torch.zeros(answer.numel(), dtype=torch.bool)
        active[n * block : (n + 1) * block] = torch.rand(block, generator=gen) < t
        hidden = active.clone()
        hidden[(n + 1) * block :] = True
        noisy.append(torch.cat([prompt, torch.where(hidden, torch.full_like(answer, mask_id), answer)]))
        targets.append(torch.cat([torch.zeros(prompt.numel(), dtype=torch.bool), active]))
    return torch.cat(noisy), torch.cat(targets), tuple(r.numel() for r in noisy)


def certainty_forcing_loss(
    spec: ArchSpec,
    params: dict[str, torch.Tensor],
    pairs: list[tuple[torch.Tensor, torch.Tensor]],
    block: int,
    gen: torch.Generator,
    certainty: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the active block's masked tokens against the model's own answer, plus
    `certainty` times the mean entropy of those it already predicts right (dParallel's entropy
    term: confidence is what lets threshold decoding reveal several tokens a pass)."""
    noisy, targets, lengths = semi_autoregressive_mask(pairs, block, spec.mask_token_id, gen)
    clean = torch.cat([torch.cat(pair) for pair in pairs])
    weights = from_state_dict(spec, params)
    hidden = transformer.hidden_states(EagerOps(), spec, weights, noisy[None], Packing(lengths))
    logits = F.linear(hidden.reshape(noisy.numel(), -1)[targets], weights.lm_head).float()
    loss = F.cross_entropy(logits, clean[targets])
    right = logits.argmax(-1) == clean[targets]
    if certainty and right.any():  # sharpen only where the model already picks its own token
        logp = logits[right].log_softmax(-1)
        loss = loss + certainty * -(logp.exp() * logp).sum(-1).mean()
    return loss


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

    `tokens`: a stream to draw windows of `seq_len` from, or (2-D) samples, each read once in
    batches of `batch_size`. Mask ratios t ~ U(0, 1) (the training distribution: heavily masked
    sequences dominate and approach the unigram entropy), or a fixed `mask_ratio`, where context
    matters more.
    """
    gen = torch.Generator().manual_seed(seed)
    if tokens.ndim == 2:
        batches_of = list(tokens.split(batch_size))
    else:
        batches_of = [sample_batch(tokens, batch_size, seq_len, gen) for _ in range(batches)]
    total, count = 0.0, 0
    for batch in batches_of:
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
        self,
        spec: ArchSpec,
        cfg: TrainConfig,
        train_tokens: torch.Tensor,
        val_tokens: torch.Tensor,
        run_dir: Path,
        functions: torch.Tensor | None = None,
    ):
        """`functions`: the function stage's samples, one EOS-padded function a row."""
        if cfg.function_stage and (functions is None or not len(functions)):
            raise ValueError("the recipe has a function stage but no function samples were given")
        self.spec, self.cfg, self.run_dir = spec, cfg, Path(run_dir)
        self.train_tokens, self.val_tokens, self.functions = train_tokens, val_tokens, functions
        self.answers: list[tuple[torch.Tensor, torch.Tensor]] = []  # the distillation stage's (prompt, answer)
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
        """Warm-up then cosine to 10%, in each stage."""
        start, stage = self.cfg.stage_at(step)
        lr, warmup, steps = (
            (stage.lr, stage.warmup, stage.steps) if stage else (self.cfg.lr, self.cfg.warmup, self.cfg.steps)
        )
        step -= start
        if step < warmup:
            return lr * (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))

    def loss(self) -> torch.Tensor:
        """This step's batch and loss: file windows; with the function stage fewer of them beside
        whole EOS-padded functions; with the distillation stage, beside the model's own answers."""
        _, stage = self.cfg.stage_at(self.step)
        if stage is None:
            batch = sample_batch(self.train_tokens, self.cfg.batch_size, self.cfg.seq_len, self.gen)
            return masked_diffusion_loss(self.spec, self.params, batch, self.gen)[0]
        if isinstance(stage, DistillStage) and not self.answers:
            raise ValueError("the distillation stage needs the model's answers (Trainer.answers)")
        files = sample_batch(self.train_tokens, stage.files, self.cfg.seq_len, self.gen)
        if isinstance(stage, FunctionStage):
            picked = torch.randint(0, len(self.functions), (stage.functions,), generator=self.gen)
            batch = list(files) + list(self.functions[picked])
            return masked_diffusion_loss(self.spec, self.params, batch, self.gen)[0]
        picked = torch.randint(0, len(self.answers), (stage.answers,), generator=self.gen).tolist()
        pairs = [self.answers[i] for i in picked]
        distilled = certainty_forcing_loss(self.spec, self.params, pairs, stage.block_length, self.gen, stage.certainty)
        return masked_diffusion_loss(self.spec, self.params, files, self.gen)[0] + distilled

    def train(self, on_step: Callable[[int, float], None] | None = None, until: int | None = None) -> None:
        """Train to step `until` (default: the end of the recipe)."""
        resumed_at, before = time.perf_counter(), self.seconds
        ends = {start for start, _ in self.cfg.stages()[1:]} | {self.cfg.total_steps}
        while self.step < (until or self.cfg.total_steps):
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(self.step)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
                loss = self.loss()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params.values(), 1.0)
            self.opt.step()
            self.step += 1
            self.seconds = before + time.perf_counter() - resumed_at
            loss = float(loss.detach())
            if on_step:
                on_step(self.step, loss)
            if self.step % self.cfg.eval_every == 0 or self.step in ends:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cfg.bf16_autocast):
                    val = evaluate(self.spec, self.params, self.val_tokens, self.cfg.seq_len)
                self.history.append({"step": self.step, "train_loss": loss, "val_ce": val, "seconds": self.seconds})
                log.info("step %d: train loss %.3f, validation CE %.3f", self.step, loss, val)
            if self.step % self.cfg.save_every == 0 or self.step in ends:
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
