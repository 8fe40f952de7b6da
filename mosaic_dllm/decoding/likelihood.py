"""Monte Carlo log-likelihoods of a target given a prefix, as each family's official evaluation
computes them, with mask-only logits: LLaDA's (`log_likelihood`, below) and Dream's
(`dream_log_likelihood`, HKUNLP/Dream `eval/eval.py`).

LLaDA (ML-GSAI/LLaDA `get_log_likelihood.py`, `eval_llada.py`):

Each Monte Carlo batch copies prefix + target `batch_size` times and masks, in copy i, a count of
target positions spread evenly over [1, target length] from a random start, at random places; the
estimate is minus the mean over batches of sum(cross-entropy at masked positions / mask ratio) /
batch_size. The random draws (one start, then one permutation per copy) come from `gen` in the
official order, so a generator seeded like the official global seed gives the official value; the
official script draws the start on the model's device and the permutations on the CPU (its
`randperm` names no device), so on a GPU those come from `cpu_gen`, a CPU generator seeded alike.

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

from ..plan.search import DoesNotFit
from ..plan.shapes import RequestShape
from ..runtime import Executor
from ..runtime.executor import StepInput
from .rows import cfg_combine, select_rows


@dataclass(frozen=True)
class LikelihoodOptions:
    """How a likelihood is estimated: `mc_num` samples, `batch_size` per forward pass (the official
    `batch_size`); LLaDA's unsupervised guidance `cfg_scale`; Dream's `log_type` (ftb: noise the
    target only; btf: the prefix; union: both, divided by the length), `sampling_eps` (the lowest
    mask level), `add_bos_token` (its script's setting) and `max_length` (left truncation);
    `copies_per_pass`: copies of consecutive runs one planned pass may pack (values unchanged)."""

    mc_num: int = 128
    batch_size: int = 32
    cfg_scale: float = 0.0
    log_type: str = "ftb"
    sampling_eps: float = 1e-3
    add_bos_token: bool = False
    max_length: int = 2048
    copies_per_pass: int = 128  # copies of several runs (and requests) one planned pass may pack

    def check(self) -> None:
        if self.batch_size < 1 or self.mc_num < 1:
            raise ValueError(f"mc_num ({self.mc_num}) and batch_size ({self.batch_size}) must be positive")
        if self.log_type not in LOG_TYPES:
            raise ValueError(f"log_type must be one of {LOG_TYPES}, got {self.log_type!r}")
        if not 0 <= self.sampling_eps < 1:
            raise ValueError(f"sampling_eps must be in [0, 1), got {self.sampling_eps}")


LOG_TYPES = ("ftb", "btf", "union")


def mask_batch(
    seq: Tensor, prefix_length: int, mask_id: int, gen: torch.Generator, cpu_gen: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """(masked copies, mask ratio per copy) for (b, L) copies of one sequence: copy i masks x_i
    target positions, x_i evenly spaced over [1, target length] from a random start (drawn from
    `gen` on the sequence's device), placed by a random permutation (drawn on the CPU from
    `cpu_gen`, default `gen`)."""
    cpu_gen = cpu_gen or gen
    b, length = seq.shape
    target = length - prefix_length
    start = torch.randint(1, target + 1, (), generator=gen, device=seq.device)
    counts = torch.round(torch.linspace(float(start), start + (b - 1) * (target / b), steps=b, device=seq.device))
    counts = ((counts.long() - 1) % target) + 1
    masked = torch.arange(target, device=seq.device).repeat(b, 1) < counts.unsqueeze(1)
    for i in range(b):
        masked[i] = masked[i][torch.randperm(target, generator=cpu_gen, device=cpu_gen.device).to(seq.device)]
    masked = torch.cat((torch.zeros(b, prefix_length, dtype=torch.bool, device=seq.device), masked), dim=1)
    return torch.where(masked, mask_id, seq), counts / target


@dataclass
class Run:
    """One Monte Carlo batch of one request, drawn: each copy's step (its canvas and the hidden rows
    it scores), the tokens those rows must predict and the copy's divisor (its mask ratio or level);
    the run's loss is the sum of cross-entropy / divisor over its copies in order, over `batch`."""

    steps: list[StepInput]
    targets: list[Tensor]
    divisors: Tensor  # (copies,) float32
    batch: int
    length: int
    cfg_scale: float = 0.0


def llada_runs(
    prefix: Tensor,
    target: Tensor,
    mask_id: int,
    gen: torch.Generator,
    options: LikelihoodOptions,
    cpu_gen: torch.Generator | None = None,
) -> list[Run]:
    """LLaDA's runs for one request, drawn from `gen` (and `cpu_gen`, see `mask_batch`) in the
    official order."""
    b, mc_num = options.batch_size, options.mc_num
    if target.numel() == 0:
        raise ValueError("the target is empty: there is nothing to score")
    if b < 1 or mc_num < b or mc_num % b:
        raise ValueError(f"mc_num ({mc_num}) must be a positive multiple of batch_size ({b})")
    seq = torch.cat([prefix, target]).unsqueeze(0).repeat(b, 1)
    runs = []
    for _ in range(mc_num // b):
        noisy, ratio = mask_batch(seq, prefix.numel(), mask_id, gen, cpu_gen)
        steps, targets = [], []
        for i, copy in enumerate(noisy):
            ids = copy.unsqueeze(0)
            if options.cfg_scale > 0:  # the unconditional copy: the prefix masked too
                unconditional = ids.clone()
                unconditional[:, : prefix.numel()] = mask_id
                ids = torch.cat([ids, unconditional])
            rows = (copy == mask_id).nonzero().flatten()
            steps.append(StepInput(ids, rows))
            targets.append(seq[i, rows])
        runs.append(Run(steps, targets, ratio, b, seq.shape[1], options.cfg_scale))
    return runs


def dream_runs(
    prefix: Tensor, target: Tensor, mask_id: int, gen: torch.Generator, options: LikelihoodOptions
) -> list[Run]:
    """Dream's runs for one request (`_eval_target_nll_mc`), drawn from `gen` in its order: per run
    one level per copy, each position masked independently at its copy's level, never the first or
    the last, the noise kept over the target (ftb), the prefix (btf) or both (union); position p
    is scored from hidden row p - 1 (the logits are shifted)."""
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
    runs = []
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
        runs.append(Run(steps, [seq[i, pos] for i, pos in enumerate(positions)], levels, b, length))
    return runs


@torch.inference_mode()
def score_runs(executor: Executor, runs: list[Run], copies_per_pass: int = 0) -> list[float]:
    """Each run's loss. A batch-invariant executor packs the copies of consecutive runs (of several
    requests too) into one pass, up to `copies_per_pass` (0: one run a pass) and while the pass's
    plan fits the budget: a row's bits do not depend on what shares its pass, so each run's loss is
    its own. Any other executor (eager) runs each run as the official code does: one forward of
    its copies."""
    groups: list[list[Run]] = []
    copies = 0  # in the last group
    for run in runs:
        more = copies + len(run.steps)
        if groups and executor.batch_invariant and more <= copies_per_pass and _fits(executor, [*groups[-1], run]):
            groups[-1].append(run)
            copies = more
        else:
            groups.append([run])
            copies = len(run.steps)
    losses = []
    for group in groups:
        steps = [step for run in group for step in run.steps]
        with executor.batch_logits(steps, as_one_batch=True) as reads:
            reads = iter(reads)
            for run in group:
                combine, parts = cfg_combine(run.cfg_scale), [torch.zeros(0, dtype=torch.float32)]
                for (_, rows, _), targets, divisor in zip(run.steps, run.targets, run.divisors, strict=True):
                    for part, logits in select_rows(next(reads)(), rows, run.length):
                        loss = F.cross_entropy(combine(logits), targets[part], reduction="none")
                        parts.append(loss / divisor.expand(loss.numel()))  # float32, as the official division
                losses.append((torch.cat(parts).sum() / run.batch).item())
    return losses


def _fits(executor: Executor, runs: list[Run]) -> bool:
    """Whether one pass of these runs' copies fits the executor's budget."""
    shapes = [RequestShape(s.ids.shape[0], s.ids.shape[1], max(s.rows.numel(), 1)) for r in runs for s in r.steps]
    try:
        executor.plan_batch(shapes)
    except DoesNotFit:
        return False
    return True


def estimates(losses: list[float], runs_per_request: list[int], lengths: list[int] | None = None) -> list[float]:
    """Minus each request's mean run loss, in order (`lengths`: union's division by the length)."""
    out, at = [], 0
    for i, n in enumerate(runs_per_request):
        value = -sum(losses[at : at + n]) / n
        out.append(value / lengths[i] if lengths else value)
        at += n
    return out


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
    """LLaDA's official Monte Carlo estimate of log p(target | prefix) (`mc_num` samples,
    `batch_size` per forward pass, unsupervised guidance `cfg_scale`)."""
    options = LikelihoodOptions(mc_num=mc_num, batch_size=batch_size, cfg_scale=cfg_scale)
    runs = llada_runs(prefix, target, mask_id, gen, options)
    return estimates(score_runs(executor, runs), [len(runs)])[0]


def dream_levels(b: int, length: int, gen: torch.Generator, eps: float, device: torch.device) -> Tensor:
    """Dream's per-copy mask levels (b,) for one run: one uniform u0, copy i at (u0 + i / b) mod 1,
    scaled into [eps, 1) (float32, as its `_forward_process`)."""
    u0 = torch.rand(1, generator=gen, device=device, dtype=torch.float32)
    t = (u0 + torch.arange(b, device=device).float() / b) % 1
    return (1 - eps) * t + eps


def dream_log_likelihood(
    executor: Executor, prefix: Tensor, target: Tensor, mask_id: int, gen: torch.Generator, options: LikelihoodOptions
) -> float:
    """Dream's Monte Carlo estimate (`_eval_target_nll_mc`): minus the mean of its runs' losses
    (`dream_runs`); union: also over the length."""
    runs = dream_runs(prefix, target, mask_id, gen, options)
    lengths = [prefix.numel() + target.numel()] if options.log_type == "union" else None
    return estimates(score_runs(executor, runs), [len(runs)], lengths)[0]


def batched_estimates(
    executor: Executor,
    pairs: list[tuple[Tensor, Tensor]],
    draw,
    gen: torch.Generator,
    options: LikelihoodOptions,
    by_length: bool = False,
) -> list[float]:
    """Several requests' estimates, each the value it has alone: every request's runs are drawn
    from `gen` in request order (the draws never depend on the network), then scored with passes
    shared across runs and requests (`score_runs`). `draw(prefix, target, gen=, options=)` -> runs;
    `by_length`: each estimate divided by its sequence's length (Dream's union)."""
    runs, counts, lengths = [], [], []
    for prefix, target in pairs:
        mine = draw(prefix, target, gen=gen, options=options)
        runs += mine
        counts.append(len(mine))
        lengths.append(prefix.numel() + target.numel())
    return estimates(score_runs(executor, runs, options.copies_per_pass), counts, lengths if by_length else None)
