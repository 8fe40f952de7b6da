"""Dream denoising with the official semantics (Dream-org generation_utils.py, `_sample`).

One canvas, timesteps linspace(1, eps, steps + 1); logits shifted right by one position; `origin`
reveals each masked token with probability 1 - s/t; the other algorithms rank masked positions by
max probability, top1 - top2 margin or negative entropy and reveal int(n * (1 - s/t)) of them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from ..config import GenerationConfig
from .common import DenoiseResult, LogitsFn, StepCallback, StepEvent, answer_complete, notify
from .schedule import dream_timesteps, dream_transfer_count


def top_p_logits(logits: Tensor, top_p: float) -> Tensor:
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cumulative = torch.cumsum(F.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cumulative > top_p
    remove[..., 1:] = remove[..., :-1].clone()  # keep the first token above the threshold
    remove[..., 0] = 0
    mask = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, sorted_indices, remove)
    return logits.masked_fill(mask, torch.finfo(logits.dtype).min)


def top_k_logits(logits: Tensor, top_k: int) -> Tensor:
    top_k = min(top_k, logits.size(-1))
    remove = logits < torch.topk(logits, top_k)[0][..., -1, None]
    return logits.masked_fill(remove, torch.finfo(logits.dtype).min)


def categorical_sample(probs: Tensor, gen: torch.Generator) -> Tensor | None:
    """torch.distributions.Categorical(probs).sample() with an explicit generator.

    Returns None where Categorical would raise (its simplex check fails, e.g. for coarse bf16
    probabilities), in which case the official code falls back to the argmax.
    """
    normalized = probs / probs.sum(-1, keepdim=True)
    if Distribution._validate_args and not bool(constraints.simplex.check(normalized).all()):
        return None
    try:
        flat = normalized.reshape(-1, normalized.shape[-1])
        return torch.multinomial(flat, 1, True, generator=gen).T.reshape(normalized.shape[:-1])
    except RuntimeError:
        return None


def sample_tokens(
    logits: Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    gen: torch.Generator,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
) -> tuple[Tensor, Tensor]:
    """(N, V) logits of masked positions -> (confidence, x0), both (N,)."""
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    x0 = categorical_sample(probs, gen) if temperature > 0 else None
    if x0 is not None:
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0


def shift_logits(logits: Tensor) -> Tensor:
    """The hidden state at p-1 predicts token p; position 0 keeps its own logits."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def denoise(
    logits_fn: LogitsFn,
    prompt: Tensor,
    cfg: GenerationConfig,
    mask_id: int,
    eos_ids: tuple[int, ...],
    gen: torch.Generator,
    callback: StepCallback | None = None,
) -> DenoiseResult:
    p_len = prompt.numel()
    x = torch.full((1, p_len + cfg.gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[0, :p_len] = prompt
    timesteps = dream_timesteps(cfg.steps, cfg.eps, x.device)
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, gen=gen)
    for i in range(cfg.steps):
        mask_index = x == mask_id
        logits = shift_logits(logits_fn(x))
        mask_logits = logits[mask_index]
        t, s = timesteps[i], timesteps[i + 1]
        before = int(mask_index.sum())
        if cfg.alg == "origin":
            p_transfer = 1 - s / t if i < cfg.steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_id
            chosen = torch.rand(*x0.shape, generator=gen, device=x.device) < p_transfer
            _, x0[chosen] = sample_tokens(mask_logits[chosen], **sampling)
            x[mask_index] = x0.clone()
        else:
            confidence, x0 = sample_tokens(
                mask_logits, margin_confidence=cfg.alg == "topk_margin", neg_entropy=cfg.alg == "entropy", **sampling
            )
            n = dream_transfer_count(mask_index, i, cfg.steps, timesteps)
            full_confidence = torch.full_like(x, -torch.inf, dtype=logits.dtype)
            full_confidence[mask_index] = confidence
            if n > 0:
                if cfg.alg_temp is None or cfg.alg_temp == 0:
                    _, transfer = torch.topk(full_confidence, n)
                else:
                    weights = F.softmax(full_confidence / cfg.alg_temp, dim=-1)
                    transfer = torch.multinomial(weights, num_samples=n, generator=gen)
                x_ = torch.zeros_like(x) + mask_id
                x_[mask_index] = x0.clone()
                rows = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer)
                x[rows, transfer] = x_[rows, transfer]
        revealed = before - int((x == mask_id).sum())
        notify(callback, StepEvent(i + 1, cfg.steps, 0, x[0], p_len, mask_id, revealed))
        if cfg.stop_at_eos and answer_complete(x[0], p_len, mask_id, eos_ids):
            return DenoiseResult(x[0], i + 1, i + 1, stopped_at_eos=True)
    return DenoiseResult(x[0], cfg.steps, cfg.steps, stopped_at_eos=False)
