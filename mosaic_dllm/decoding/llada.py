"""LLaDA / LLaDA-MoE denoising with the official semantics (ML-GSAI/LLaDA generate.py).

Semi-autoregressive blocks; per block a fixed quota of tokens per step; x0 from argmax (or float64
Gumbel-max at temperature > 0); confidence from a softmax in the logits' dtype or uniform noise;
positions after the current block never compete; the top-k of the quota is revealed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import GenerationConfig
from .common import DenoiseResult, LogitsFn, StepCallback, StepEvent, answer_complete, notify
from .schedule import llada_transfer_counts


def guided_logits(logits_fn: LogitsFn, x: Tensor, prompt_index: Tensor, mask_id: int, cfg_scale: float) -> Tensor:
    """Classifier-free guidance: un + (cfg + 1) * (cond - un), the unconditional copy with the prompt masked."""
    if cfg_scale <= 0:
        return logits_fn(x)
    un_x = x.clone()
    un_x[prompt_index] = mask_id
    cond, un = torch.chunk(logits_fn(torch.cat([x, un_x], dim=0)), 2, dim=0)
    return un + (cfg_scale + 1) * (cond - un)


def propose(logits: Tensor, temperature: float, remasking: str, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """x0 and its confidence for every position, from full (B, L, V) logits, as the official code does."""
    if temperature > 0:  # Gumbel-max in float64 over the whole (B, L, V)
        lg = logits.to(torch.float64)
        noise = torch.rand(lg.shape, dtype=torch.float64, generator=gen, device=lg.device)
        x0 = torch.argmax(lg.exp() / (-torch.log(noise)) ** temperature, dim=-1)
    else:
        x0 = torch.argmax(logits, dim=-1)
    if remasking == "low_confidence":
        p = F.softmax(logits, dim=-1)
        confidence = torch.gather(p, dim=-1, index=x0.unsqueeze(-1)).squeeze(-1)
    else:
        confidence = torch.rand(x0.shape, generator=gen, device=x0.device)
    return x0, confidence


def denoise(
    logits_fn: LogitsFn,
    prompt: Tensor,
    cfg: GenerationConfig,
    mask_id: int,
    eos_ids: tuple[int, ...],
    gen: torch.Generator,
    callback: StepCallback | None = None,
) -> DenoiseResult:
    """prompt: (P,) ids. Returns the (P + gen_length,) canvas."""
    p_len = prompt.numel()
    x = torch.full((1, p_len + cfg.gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[0, :p_len] = prompt
    prompt_index = x != mask_id
    steps_per_block = cfg.steps // cfg.num_blocks
    passes = 0
    for block in range(cfg.num_blocks):
        start = p_len + block * cfg.block_length
        end = start + cfg.block_length
        quota = llada_transfer_counts(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            logits = guided_logits(logits_fn, x, prompt_index, mask_id, cfg.cfg_scale)
            passes += 1
            x0, x0_p = propose(logits, cfg.temperature, cfg.remasking, gen)
            x0_p[:, end:] = -torch.inf
            x0 = torch.where(mask_index, x0, x)
            confidence = torch.where(mask_index, x0_p, -torch.inf)
            transfer = torch.zeros_like(x0, dtype=torch.bool)
            for row in range(confidence.shape[0]):
                _, chosen = torch.topk(confidence[row], k=int(quota[row, i]))
                transfer[row, chosen] = True
            x[transfer] = x0[transfer]
            step = block * steps_per_block + i + 1
            notify(callback, StepEvent(step, cfg.steps, block, x[0], p_len, mask_id, int(transfer.sum())))
            if cfg.stop_at_eos and answer_complete(x[0], p_len, mask_id, eos_ids):
                return DenoiseResult(x[0], passes, step, stopped_at_eos=True)
    return DenoiseResult(x[0], passes, cfg.steps, stopped_at_eos=False)
