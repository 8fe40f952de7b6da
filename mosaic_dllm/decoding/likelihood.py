"""Monte Carlo log-likelihoods of a target given a prefix, as each family's official evaluation
computes them, with mask-only logits: LLaDA's (`log_likelihood`, below) and Dream's
(`dream_log_likelihood`, HKUNLP/Dream `eval/eval.py`).

LLaDA (ML-GSAI/LLaDA `get_log_likelihood.py`, `eval_llada.py`):

Each Monte Carlo batch copies prefix + target `batch_size` times and masks, in copy i, a count of
target positions spread evenly over [1, target length] from a random start, at random places; the
estimate is minus the mean over batches of sum(cross-entropy at masked positions / mask ratio) /
batch_size. The random draws (one start, then one permutation per copy) come from `gen` in the
official order, so a generator seeded like the official global seed gives the official value.

The network runs only where it is read: every copy is a request of one step (two sequences with
guidance) whose rows are its masked positions, all copies packed into one forward pass; the LM
head runs over the masked rows only. Per-row cross-entropies are concatenated in the official
order (copy by copy, position by position) and summed once, as the official sum over the masked
entries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime import Executor
from ..runtime.executor import StepInput
from .rows import cfg_combine, select_rows


@dataclass(frozen=True)
class LikelihoodOptions:
    """How a likelihood is estimated: `mc_num` samples, `batch_size` per forward pass (the official
    `batch_size`); LLaDA's unsupervised guidance `cfg_scale`; Dream's `log_type` (ftb: noise the
    target only; btf: the prefix; union: both, divided by the length), `sampling_eps` (the lowest
    mask level), `add_bos_token` (its script's setting) and `max_length` (left truncation)."""

    mc_num: int = 128
    batch_size: int = 32
    cfg_scale: float = 0.0
    log_type: str = "ftb"
    sampling_eps: float = 1e-3
    add_bos_token: bool = False
    max_length: int = 2048

    def check(self) -> None:
        if self.batch_size < 1 or self.mc_num < 1:
            raise ValueError(f"mc_num ({self.mc_num}) and batch_size ({self.batch_size}) must be positive")
        if self.log_type not in LOG_TYPES:
            raise ValueError(f"log_type must be one of {LOG_TYPES}, got {self.log_type!r}")
        if not 0 <= self.sampling_eps < 1:
            raise ValueError(f"sampling_eps must be in [0, 1), got {self.sampling_eps}")


LOG_TYPES = ("ftb", "btf", "union")


def mask_batch(seq: Tensor, prefix_length: int, mask_id: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """(masked copies, mask ratio per copy) for (b, L) copies of one sequence: copy i masks x_i
    target positions, x_i evenly spaced over [1, target length] from a random start, placed by a
    random permutation."""
    b, length = seq.shape
    target = length - prefix_length
    start = torch.randint(1, target + 1, (), generator=gen, device=seq.device)
    counts = torch.round(torch.linspace(float(start), start + (b - 1) * (target / b), steps=b, device=seq.device))
    counts = ((counts.long() - 1) % target) + 1
    masked = torch.arange(target, device=seq.device).repeat(b, 1) < counts.unsqueeze(1)
    for i in range(b):
        masked[i] = masked[i][torch.randperm(target, generator=gen, device=seq.device)]
    masked = torch.cat((torch.zeros(b, prefix_length, dtype=torch.bool, device=seq.device), masked), dim=1)
    return torch.where(masked, mask_id, seq), counts / target


@torch.inference_mode()
def log_likelihood(
    executor: Executor,
    prefix: Tensor,
    target: Tensor,
    mask_id: int,
    gen: torch.Generator,
    mc_num: int = 128,
    batch_size: int = 32,
    cfg_scale: float = 0.0,
) -> float:
    """The official Monte Carlo estimate of log p(target | prefix) (`mc_num` samples, `batch_size`
    per forward pass, unsupervised guidance `cfg_scale`)."""
    if target.numel() == 0:
        raise ValueError("the target is empty: there is nothing to score")
    if batch_size < 1 or mc_num < batch_size or mc_num % batch_size:
        raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of batch_size ({batch_size})")
    seq = torch.cat([prefix, target]).unsqueeze(0).repeat(batch_size, 1)
    length, combine = seq.shape[1], cfg_combine(cfg_scale)
    estimates = []
    for _ in range(mc_num // batch_size):
        noisy, ratio = mask_batch(seq, prefix.numel(), mask_id, gen)
        steps = []
        for copy in noisy:
            ids = copy.unsqueeze(0)
            if cfg_scale > 0:  # the unconditional copy: the prefix masked too
                unconditional = ids.clone()
                unconditional[:, : prefix.numel()] = mask_id
                ids = torch.cat([ids, unconditional])
            steps.append(StepInput(ids, (copy == mask_id).nonzero().flatten()))
        losses = []
        with executor.batch_logits(steps, as_one_batch=True) as reads:
            for i, ((_, rows, _), read) in enumerate(zip(steps, reads, strict=True)):
                for part, logits in select_rows(read(), rows, length):
                    targets = seq[i, rows[part]]
                    loss = F.cross_entropy(combine(logits), targets, reduction="none")
                    losses.append(loss / ratio[i].expand(targets.numel()))  # float32, as the official division
        estimates.append((torch.cat(losses).sum() / batch_size).item())
    return -sum(estimates) / len(estimates)


def dream_levels(b: int, length: int, gen: torch.Generator, eps: float, device: torch.device) -> Tensor:
    """Dream's per-copy mask levels (b,) for one run: one uniform u0, copy i at (u0 + i / b) mod 1,
    scaled into [eps, 1) (float32, as its `_forward_process`)."""
    u0 = torch.rand(1, generator=gen, device=device, dtype=torch.float32)
    t = (u0 + torch.arange(b, device=device).float() / b) % 1
    return (1 - eps) * t + eps


@torch.inference_mode()
def dream_log_likelihood(
    executor: Executor, prefix: Tensor, target: Tensor, mask_id: int, gen: torch.Generator, options: LikelihoodOptions
) -> float:
    """Dream's Monte Carlo estimate (`_eval_target_nll_mc`): `max(mc_num // batch_size, 1)` runs of
    `batch_size` copies; copy i masks each position independently with its level p_i (one uniform
    per position of the whole sequence), never the first or the last, keeping the noise only over
    the target (ftb), the prefix (btf) or both (union); the loss is the cross-entropy at masked
    positions (logits shifted: position p reads hidden row p - 1) over p_i, summed, over the batch
    size; the estimate is minus its mean over runs (union: also over the length)."""
    options.check()
    if target.numel() == 0:
        raise ValueError("the target is empty: there is nothing to score")
    if options.cfg_scale:
        raise ValueError(
            "Dream's evaluation has no working guidance (its classifier_free_guidance branch reads an "
            "undefined attribute upstream): leave cfg_scale at 0"
        )
    b, p_len, t_len = options.batch_size, prefix.numel(), target.numel()
    seq = torch.cat([prefix, target]).unsqueeze(0).repeat(b, 1)
    length = seq.shape[1]
    estimates = []
    for _ in range(max(options.mc_num // b, 1)):
        levels = dream_levels(b, length, gen, options.sampling_eps, seq.device)
        drawn = torch.rand((b, length), generator=gen, device=seq.device) < levels[:, None].repeat(1, length)
        drawn[:, 0] = False  # the first and the last position are never masked
        drawn[:, -1] = False
        noisy = torch.where(drawn, mask_id, seq)
        perturbed = seq.clone()
        if options.log_type == "ftb":
            perturbed[:, -t_len:] = noisy[:, -t_len:]
        elif options.log_type == "btf":
            perturbed[:, :p_len] = noisy[:, :p_len]
        else:
            perturbed = noisy
        positions = [(row == mask_id).nonzero().flatten() for row in perturbed]
        hidden = [(pos - 1).clamp(min=0) for pos in positions]  # the shift: position p reads row p - 1
        steps = [StepInput(row.unsqueeze(0), rows) for row, rows in zip(perturbed, hidden, strict=True)]
        losses = [torch.zeros(0, dtype=torch.float32, device=seq.device)]
        with executor.batch_logits(steps, as_one_batch=True) as reads:
            for i, ((_, rows, _), read) in enumerate(zip(steps, reads, strict=True)):
                for part, logits in select_rows(read(), rows, length):
                    targets = seq[i, positions[i][part]]
                    loss = F.cross_entropy(logits[0], targets, reduction="none")
                    losses.append(loss / levels[i].expand(targets.numel()))  # float32, as the official division
        estimates.append((torch.cat(losses).sum() / b).item())
    value = -sum(estimates) / len(estimates)
    return value / (t_len + p_len) if options.log_type == "union" else value
