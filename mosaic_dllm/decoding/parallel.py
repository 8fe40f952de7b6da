"""Fast-dLLM's parallel decoding for LLaDA / LLaDA-MoE (NVlabs/Fast-dLLM `v1/llada/generate.py`, the
current upstream), opt-in; Dream's block sampler is `dream.BlockDreamState` (it shares the block
cache made here).

An approximation of the official sampler, exact to Fast-dLLM's code: semi-autoregressive blocks as
the official sampler, but a block runs until none of its positions is masked (with the dual cache:
at most steps / blocks forward passes, masks may remain), and a step reveals

- threshold: every masked position at or above `threshold`, and the most confident one (the first
  of equal ones) whatever its confidence (`get_transfer_index` with a threshold);
- factor: the n most confident, for the largest n whose n-th confidence is at least
  1 - factor / (n + 1) (`get_transfer_index_dynamic`, quirks included: when only the last one
  fails, all are revealed);
- neither: the official per-step quota, the first of a descending sort (only with a cache: without
  one it is the official sampler).

A step over the whole canvas reads every masked position before the block's end: with the dual
cache, positions an earlier block left masked compete again. Unlike the official sampler,
confidences are float64 softmax probabilities, and `random` remasking draws a float64 uniform per
row of Fast-dLLM's logits (float32 with a factor). Ties go as torch.sort / torch.topk order them
over a confidence vector of the reference's length, so the candidates are ranked on that length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..config import GenerationConfig
from ..models.kv_cache import BlockCache, CacheUse
from ..models.spec import ArchSpec
from .common import DenoiseState, StepEvent, StepInput
from .rows import RowChunks, UniformReplay, propose
from .schedule import llada_transfer_counts


def threshold_transfer(confidence: Tensor, mask: Tensor, threshold: float) -> Tensor:
    """Indices revealed: every masked one at or above `threshold`, and the first most confident."""
    chosen = mask & (confidence >= threshold)
    chosen[torch.argmax(confidence)] = True
    return (chosen & mask).nonzero().flatten()


def quota_transfer(confidence: Tensor, mask: Tensor, quota: int) -> Tensor:
    """Indices revealed: the first `quota` of a descending sort, masked ones only."""
    chosen = torch.sort(confidence, descending=True)[1][:quota]
    return chosen[mask[chosen]]


def factor_transfer(confidence: Tensor, mask: Tensor, factor: float) -> Tensor:
    """Indices revealed by Fast-dLLM's factor rule (`get_transfer_index_dynamic`)."""
    masked = int(mask.sum())
    bounds = [-1.0] + [1 - factor / (n + 1) for n in range(2, masked + 1)]
    ranked = torch.sort(confidence[mask], descending=True)[0]
    top = 0
    for top in range(masked):
        if ranked[top] < bounds[top]:
            break
    if top == 0 or top == masked - 1:
        top += 1
    return torch.topk(confidence, k=top)[1]


class BlockState(DenoiseState):
    """What Fast-dLLM's block samplers share: a block runs until none of its positions is masked
    (or its sampler's cap on steps is reached); with a cache, its first step runs the whole canvas and refreshes the
    cache, its other steps run a window: the block and everything after it (`prefix`) or the
    block alone (`dual`)."""

    def __init__(self, spec: ArchSpec, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator):
        super().__init__(prompt, cfg, gen, spec.mask_token_id, spec.eos_token_ids)
        self.steps_per_block = cfg.steps // cfg.num_blocks
        self.block, self.block_step = 0, 0
        self.cache = block_cache(spec, prompt.numel(), cfg)
        self.window = (0, self.x.shape[1])  # the canvas positions this step runs

    @property
    def total_steps(self) -> int:
        return self.cfg.most_steps

    def block_span(self) -> tuple[int, int]:
        start = self.prompt_length + self.block * self.cfg.block_length
        return start, start + self.cfg.block_length

    def cache_use(self) -> CacheUse | None:
        """How this step uses the cache; sets the window it runs."""
        start, end = self.block_span()
        length = self.x.shape[1]
        if self.cache is None or self.block_step == 0:
            self.window = (0, length)
            if self.cache is None:
                return None
            return CacheUse(self.cache, refresh=True, keep=start if self.cfg.cache == "prefix" else length)
        self.window = (start, length if self.cfg.cache == "prefix" else end)
        return CacheUse(self.cache, refresh=False, start=start, length=length)

    def end_step(self, block_done: bool, revealed: int) -> StepEvent:
        """Count the step, move to the next block when this one is done, free the cache at the end."""
        block = self.block
        self.block_step += 1
        if block_done:
            self.block, self.block_step = self.block + 1, 0
        event = self.finish_step(block, revealed)
        if self.done and self.cache is not None:
            self.cache.release()
        return event

    def finished(self) -> bool:
        return self.block == self.cfg.num_blocks


class ParallelLLaDAState(BlockState):
    """One LLaDA / LLaDA-MoE request decoded with Fast-dLLM's settings, a step at a time."""

    def __init__(self, spec: ArchSpec, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator):
        super().__init__(spec, prompt, cfg, gen)
        self.vocab = spec.vocab_size
        self.quota: Tensor | None = None
        self.rows: Tensor | None = None

    def next_step(self) -> StepInput:
        start, end = self.block_span()
        if self.block_step == 0 and self.cfg.threshold is None and self.cfg.factor is None:
            self.quota = llada_transfer_counts(self.x[:, start:end] == self.mask_id, self.steps_per_block)
        use = self.cache_use()
        w0, w1 = self.window
        self.rows = (self.x[0, w0:end] == self.mask_id).nonzero().flatten()  # masked, up to the block's end
        return StepInput(self.x[:, w0:w1], self.rows, use)

    def propose(self, logits: Callable[[], RowChunks]) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        w0, w1 = self.window
        window = self.x[:, w0:w1]
        if cfg.temperature > 0 and cfg.cache == "prefix" and w0 > 0:  # the reference draws noise it never reads
            UniformReplay(self.gen, w1 - w0, self.vocab, window.device).finish()
        chunks = ((rows, lg[0]) for rows, lg in logits())
        uniform = torch.float32 if cfg.factor is not None else torch.float64  # get_transfer_index(_dynamic)'s draw
        return propose(
            chunks, window, self.vocab, cfg.temperature, cfg.remasking, self.gen, self.rows, torch.float64, uniform
        )

    def advance(self, logits: Callable[[], RowChunks]) -> StepEvent:
        cfg = self.cfg
        start, end = self.block_span()
        w0, w1 = self.window
        x0, x0_p = self.propose(logits)
        window = self.x[:, w0:w1]  # a view: revealing writes the canvas
        mask = window == self.mask_id
        mask[:, end - w0 :] = False
        confidence = torch.where(mask, x0_p, -torch.inf)[0]
        if cfg.factor is not None:
            chosen = factor_transfer(confidence, mask[0], cfg.factor)
        elif cfg.threshold is not None:
            chosen = threshold_transfer(confidence, mask[0], cfg.threshold)
        else:
            chosen = quota_transfer(confidence, mask[0], int(self.quota[0, self.block_step]))
        window[0, chosen] = x0[0, chosen]
        capped = cfg.cache == "dual" and self.block_step + 1 == self.steps_per_block  # the upstream's fixed loop
        return self.end_step(capped or not (self.x[0, start:end] == self.mask_id).any(), chosen.numel())


def cache_positions(length: int, block_length: int, cache: str) -> int:
    """Positions a block cache holds at its largest: the prefix before the last block, or the
    whole canvas (dual)."""
    return length - block_length if cache == "prefix" else length


def block_cache(spec: ArchSpec, prompt_length: int, cfg: GenerationConfig) -> BlockCache | None:
    """The request's cache at its largest (`cache_positions`), or None without one."""
    if cfg.cache in (None, "none"):
        return None
    positions = cache_positions(prompt_length + cfg.gen_length, cfg.block_length, cfg.cache)
    return BlockCache(spec, positions, int8=cfg.cache_dtype == "int8")  # "auto": as "model" until LLM.plan decides


def ranked_threshold(confidence: Tensor, count: int, threshold: float) -> Tensor:
    """Indices revealed by the threshold rule Fast-dLLM's Dream samplers (and its mid-2025 LLaDA
    loops) write: the top `count` by torch.topk, the first always, the others at >= threshold."""
    values, chosen = torch.topk(confidence, count)
    keep = torch.ones_like(chosen, dtype=torch.bool)
    keep[1:] = ~(values[1:] < threshold)
    return chosen[keep]
