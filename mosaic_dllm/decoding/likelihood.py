"""LLaDA's Monte Carlo log-likelihood of a target given a prefix, as the official evaluation code
computes it (ML-GSAI/LLaDA `get_log_likelihood.py`, `eval_llada.py`), with mask-only logits.

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

import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime import Executor
from ..runtime.executor import StepInput
from .llada import cfg_combine
from .rows import select_rows


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
        with executor.batch_logits(steps) as reads:
            for i, ((_, rows, _), read) in enumerate(zip(steps, reads, strict=True)):
                for part, logits in select_rows(read(), rows, length):
                    targets = seq[i, rows[part]]
                    loss = F.cross_entropy(combine(logits), targets, reduction="none")
                    losses.append(loss / ratio[i].expand(targets.numel()))  # float32, as the official division
        estimates.append((torch.cat(losses).sum() / batch_size).item())
    return -sum(estimates) / len(estimates)
