"""Dream's per-row sampling, as its official `sample_tokens` computes it (temperature, top-p,
top-k, Categorical sampling or its argmax fallback, the confidence the ranking algorithms read),
over row chunks (`sample_rows`): shared by the official sampler and Fast-dLLM's Dream samplers."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from ..memory.prediction import is_predicting
from .rows import PositionLogits


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


def categorical_valid(probs: Tensor) -> bool | None:
    """Whether torch.distributions.Categorical(probs) would accept these rows (its simplex check);
    None when values are unknown (a prediction under FakeTensorMode).

    Where it would not (coarse bf16 or long fp32 rows can fail), the official code catches the
    error and takes the argmax instead of sampling.
    """
    if probs.shape[0] == 0:
        return False  # sampling zero rows fails in the official code too; the argmax of nothing is nothing
    normalized = probs / probs.sum(-1, keepdim=True)
    if not Distribution._validate_args:
        return True
    valid = constraints.simplex.check(normalized).all()
    return None if is_predicting() else bool(valid)


def sample_tokens(
    logits: Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    gen: torch.Generator | None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
) -> tuple[Tensor, Tensor, bool | None]:
    """(N, V) logits -> (confidence, x0, sampled); gen=None forces the argmax fallback.

    `sampled` is False when temperature > 0 but Categorical would refuse these rows; None when it
    may (a prediction, values unknown: it samples, and the caller also runs the refusal's pass).
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k:  # None (the official "off") is top_k 0 here: None means unset until resolved
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    valid = categorical_valid(probs) if temperature > 0 and gen is not None else False
    sampled = valid is not False
    if sampled:  # Categorical(probs).sample() with an explicit generator
        normalized = probs / probs.sum(-1, keepdim=True)
        x0 = torch.multinomial(normalized, 1, True, generator=gen).T.reshape(probs.shape[:-1])
        confidence = torch.gather(probs, -1, x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence, x0 = probs.max(dim=-1)
    if margin_confidence:
        sorted_probs, _ = torch.sort(probs, dim=-1, descending=True)
        confidence = sorted_probs[:, 0] - sorted_probs[:, 1]
    if neg_entropy:
        confidence = torch.sum(probs * torch.log(probs + 1e-10), dim=-1)
    return confidence, x0, True if temperature <= 0 else valid


def sample_rows(
    chunks_fn: Callable[[], PositionLogits], gen: torch.Generator, temperature: float, **kw
) -> tuple[Tensor, Tensor]:
    """The official sample_tokens over all rows, computed chunk by chunk.

    The official code validates every row before sampling any: if one chunk is refused, the
    generator is rewound and every row takes the argmax, as one refused Categorical would.
    A prediction (values unknown) runs both paths.
    """
    state = gen.get_state() if temperature > 0 else None
    confidences, tokens, unknown = [], [], False

    def refused() -> tuple[Tensor, Tensor]:
        gen.set_state(state)
        pairs = [sample_tokens(lg, temperature, gen=None, **kw)[:2] for _, lg in chunks_fn()]
        return torch.cat([c for c, _ in pairs]), torch.cat([t for _, t in pairs])

    for _, logits in chunks_fn():
        confidence, x0, ok = sample_tokens(logits, temperature, gen=gen, **kw)
        if ok is False:
            return refused()
        unknown |= ok is None
        confidences.append(confidence)
        tokens.append(x0)
    if unknown:  # a prediction: sampled every row, now the refusal's pass, so its peak covers both
        return refused()
    if not tokens:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(confidences), torch.cat(tokens)
