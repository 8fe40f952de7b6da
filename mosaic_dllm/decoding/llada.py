"""LLaDA / LLaDA-MoE denoising with the official semantics (ML-GSAI/LLaDA generate.py).

Semi-autoregressive blocks; per block a fixed quota of tokens per step; x0 from argmax (or float64
Gumbel-max at temperature > 0); confidence from a softmax in the logits' dtype or uniform noise;
positions after the current block never compete; the top-k of the quota is revealed.

With a mask-only executor only the masked positions up to the end of the current block are
evaluated: the official code gives every other position a confidence of -inf, so they never win.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import GenerationConfig
from .common import DenoiseResult, StepCallback, StepEvent, answer_complete, initial_canvas, notify
from .rows import Chunks, UniformReplay, position_chunks
from .schedule import llada_transfer_counts


def cfg_combine(cfg_scale: float):
    """(B, ..., V) -> (..., V): the conditional row alone, or un + (cfg + 1) * (cond - un)."""
    if cfg_scale <= 0:
        return lambda logits: logits[0]

    def combine(logits: Tensor) -> Tensor:
        cond, un = logits[0], logits[1]
        return un + (cfg_scale + 1) * (cond - un)

    return combine


def guidance_batch(x: Tensor, prompt_index: Tensor, mask_id: int, cfg_scale: float) -> Tensor:
    """The canvas, plus for CFG an unconditional copy with the prompt replaced by the mask token."""
    if cfg_scale <= 0:
        return x
    un_x = x.clone()
    un_x[prompt_index] = mask_id
    return torch.cat([x, un_x], dim=0)


def step_chunks(executor, x: Tensor, positions: Tensor, prompt_index: Tensor, mask_id: int, cfg_scale: float) -> Chunks:
    """Logits for `positions` (mask-only executors) or for every position (official)."""
    batch = guidance_batch(x, prompt_index, mask_id, cfg_scale)
    if executor.mask_only:
        yield from position_chunks(executor, batch, positions, cfg_combine(cfg_scale))
    else:
        logits = cfg_combine(cfg_scale)(executor.logits(batch))
        yield torch.arange(x.shape[1], device=x.device), logits


def propose(
    chunks: Chunks, x: Tensor, vocab: int, temperature: float, remasking: str, gen: torch.Generator
) -> tuple[Tensor, Tensor]:
    """x0 and confidence (1, L) for the positions in `chunks`, per row exactly as the official sampler.

    Positions not in `chunks` keep their token and get confidence -inf.
    """
    length = x.shape[1]
    x0 = x.clone()
    confidence = None
    noise = UniformReplay(gen, length, vocab, x.device) if temperature > 0 else None
    for pos, logits in chunks:  # logits (C, V)
        if noise is not None:  # Gumbel-max in float64, as in the official add_gumbel_noise
            lg = logits.to(torch.float64)
            rows_x0 = torch.argmax(lg.exp() / (-torch.log(noise.take(pos))) ** temperature, dim=-1)
            del lg
        else:
            rows_x0 = torch.argmax(logits, dim=-1)
        x0[0, pos] = rows_x0
        if remasking == "low_confidence":
            if confidence is None:
                confidence = torch.full((1, length), -torch.inf, dtype=logits.dtype, device=x.device)
            p = F.softmax(logits, dim=-1)
            confidence[0, pos] = torch.gather(p, dim=-1, index=rows_x0.unsqueeze(-1)).squeeze(-1)
            del p  # not alive while the next chunk is reduced: the plan budgets one chunk's temporaries
    if noise is not None:
        noise.finish()  # keep the generator where the official full draw leaves it
    if remasking == "random":
        confidence = torch.rand((1, length), generator=gen, device=x.device)
    if confidence is None:  # no position to read this step
        confidence = torch.full((1, length), -torch.inf, device=x.device)
    return x0, confidence


def denoise(
    executor,
    prompt: Tensor,
    cfg: GenerationConfig,
    mask_id: int,
    eos_ids: tuple[int, ...],
    gen: torch.Generator,
    callback: StepCallback | None = None,
) -> DenoiseResult:
    """prompt: (P,) ids. Returns the (P + gen_length,) canvas."""
    p_len = prompt.numel()
    vocab = executor.spec.vocab_size
    x = initial_canvas(prompt, cfg.gen_length, mask_id)
    prompt_index = x != mask_id
    steps_per_block = cfg.steps // cfg.num_blocks
    passes = 0
    for block in range(cfg.num_blocks):
        start = p_len + block * cfg.block_length
        end = start + cfg.block_length
        quota = llada_transfer_counts(x[:, start:end] == mask_id, steps_per_block)
        for i in range(steps_per_block):
            mask_index = x == mask_id
            readable = mask_index[0, :end].nonzero().flatten()  # masked, up to the end of the block
            chunks = step_chunks(executor, x, readable, prompt_index, mask_id, cfg.cfg_scale)
            x0, x0_p = propose(chunks, x, vocab, cfg.temperature, cfg.remasking, gen)
            passes += 1
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
