"""Dream denoising with the official semantics (Dream-org generation_utils.py, `_sample`).

One canvas, timesteps linspace(1, eps, steps + 1); logits shifted right by one position; `origin`
reveals each masked token with probability 1 - s/t; the other algorithms rank masked positions by
max probability, top1 - top2 margin or negative entropy and reveal int(n * (1 - s/t)) of them.

With a mask-only executor the LM head runs only on the rows the sampler reads (the hidden state
at p - 1 gives the logits of p), chunk by chunk; the per-row maths is the official one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Distribution, constraints

from ..config import GenerationConfig
from .common import DenoiseResult, StepCallback, StepEvent, answer_complete, initial_canvas, notify
from .rows import Chunks, position_chunks
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


def categorical_valid(probs: Tensor) -> bool:
    """Whether torch.distributions.Categorical(probs) would accept these rows (its simplex check).

    Where it would not (coarse bf16 or long fp32 rows can fail), the official code catches the
    error and takes the argmax instead of sampling.
    """
    if probs.shape[0] == 0:
        return False  # sampling zero rows fails in the official code too; the argmax of nothing is nothing
    normalized = probs / probs.sum(-1, keepdim=True)
    return not Distribution._validate_args or bool(constraints.simplex.check(normalized).all())


def sample_tokens(
    logits: Tensor,
    temperature: float,
    top_p: float | None,
    top_k: int | None,
    gen: torch.Generator | None,
    margin_confidence: bool = False,
    neg_entropy: bool = False,
) -> tuple[Tensor, Tensor, bool]:
    """(N, V) logits -> (confidence, x0, sampled); gen=None forces the argmax fallback.

    `sampled` is False when temperature > 0 but Categorical would refuse these rows.
    """
    if temperature > 0:
        logits = logits / temperature
    if top_p is not None and top_p < 1:
        logits = top_p_logits(logits, top_p)
    if top_k is not None:
        logits = top_k_logits(logits, top_k)
    probs = torch.softmax(logits, dim=-1)
    sampled = temperature > 0 and gen is not None and categorical_valid(probs)
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
    return confidence, x0, sampled or temperature <= 0


def sample_rows(
    chunks_fn: Callable[[], Chunks], gen: torch.Generator, temperature: float, **kw
) -> tuple[Tensor, Tensor]:
    """The official sample_tokens over all rows, computed chunk by chunk.

    The official code validates every row before sampling any: if one chunk is refused, the
    generator is rewound and every row takes the argmax, as one refused Categorical would.
    """
    state = gen.get_state() if temperature > 0 else None
    confidences, tokens = [], []
    for _, logits in chunks_fn():
        confidence, x0, ok = sample_tokens(logits, temperature, gen=gen, **kw)
        if not ok:
            gen.set_state(state)
            pairs = [sample_tokens(lg, temperature, gen=None, **kw)[:2] for _, lg in chunks_fn()]
            return torch.cat([c for c, _ in pairs]), torch.cat([t for _, t in pairs])
        confidences.append(confidence)
        tokens.append(x0)
    if not tokens:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    return torch.cat(confidences), torch.cat(tokens)


def shift_logits(logits: Tensor) -> Tensor:
    """The hidden state at p-1 predicts token p; position 0 keeps its own logits."""
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


def masked_row_chunks(executor, x: Tensor, masked: Tensor, subset: Tensor | None) -> Callable[[], Chunks]:
    """Logits of the masked positions `masked` (ascending), or of `subset` of them (boolean)."""
    if executor.mask_only:
        positions = masked if subset is None else masked[subset]
        hidden_rows = lambda p: (p - 1).clamp(min=0)  # noqa: E731
        return lambda: position_chunks(executor, x, positions, lambda lg: lg[0], hidden_rows)
    cache: list[Tensor] = []

    def official() -> Chunks:  # logits for every position, then the masked rows gathered, as official
        if not cache:
            mask_logits = shift_logits(executor.logits(x))[0, masked]
            cache.append(mask_logits if subset is None else mask_logits[subset])
        yield masked, cache[0]

    return official


def denoise(
    executor,
    prompt: Tensor,
    cfg: GenerationConfig,
    mask_id: int,
    eos_ids: tuple[int, ...],
    gen: torch.Generator,
    callback: StepCallback | None = None,
) -> DenoiseResult:
    p_len = prompt.numel()
    x = initial_canvas(prompt, cfg.gen_length, mask_id)
    timesteps = dream_timesteps(cfg.steps, cfg.eps, x.device)
    sampling = dict(temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k)
    for i in range(cfg.steps):
        mask_index = x == mask_id
        t, s = timesteps[i], timesteps[i + 1]
        masked = mask_index[0].nonzero().flatten()
        before = masked.numel()
        if cfg.alg == "origin":
            p_transfer = 1 - s / t if i < cfg.steps - 1 else 1
            x0 = torch.zeros_like(x[mask_index]) + mask_id
            chosen = torch.rand(*x0.shape, generator=gen, device=x.device) < p_transfer
            _, x0[chosen] = sample_rows(masked_row_chunks(executor, x, masked, chosen), gen, **sampling)
            x[mask_index] = x0.clone()
        else:
            confidence, x0 = sample_rows(
                masked_row_chunks(executor, x, masked, None),
                gen,
                margin_confidence=cfg.alg == "topk_margin",
                neg_entropy=cfg.alg == "entropy",
                **sampling,
            )
            n = dream_transfer_count(mask_index, i, cfg.steps, timesteps)
            full_confidence = torch.full_like(x, -torch.inf, dtype=executor.dtype)
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
