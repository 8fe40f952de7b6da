"""SDAR's block-diffusion decoding (JetAstra/SDAR `generate.py`, `block_diffusion_generate`, at
c2041a8), a step at a time, over a growing K/V cache.

The canvas is the prompt and the answer padded to whole blocks of `block_length` from position 0.
Blocks made only of prompt are prefilled; then block after block (the first holds the prompt's end,
its prompt positions in place) each step samples every position of the block (one
`torch.multinomial` over the block's rows, after temperature, top-k and top-p) and reveals masked
positions by the strategy: `sequential` (the quota of the step, left to right),
`low_confidence_static` (the quota, most confident first), `low_confidence_dynamic` (every one
above `threshold`, else the quota), `entropy_bounded`. The quota of step i is
`get_num_transfer_tokens`' even split of the block over `steps`. The generation ends after a block
that holds an EOS, or after the last block.

The official loop runs a separate pass to write a finished block's K/V (and a prefill pass); here
that pass is the next block's first step: one forward pass over the finished block and the next
one, whose attention calls are the official ones (the finished block against the keys up to its
end, the prefill block-causally against its own keys: `models.kv_cache.segments`), so the bits
are the same with one pass fewer per block (and none after the last).

Where the published loop is not well defined we do what it evidently means (README, "SDAR"):
temperature 0 is greedy (the official divides the logits by zero); `entropy_bounded` ranks masked
positions by the entropy of their sampling distribution and reveals the least uncertain ones while
the entropies' sum stays within `eb_threshold`, at least one (the official raises before revealing);
a block of entropy_bounded takes as many steps as it needs (one position at least each); and a
step reveals only masked positions (with fewer masks left than its quota, the official
top-k also picks revealed ones, even prompt tokens, and overwrites them).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import SDAR, GenerationConfig, GenerationConfigError
from ..models.kv_cache import BlockCache, CacheUse
from ..models.spec import ArchSpec
from .common import DenoiseResult, DenoiseState, NoLikelihood, StepEvent, StepExtent, StepInput
from .cost import measure_row_bytes
from .rows import RowChunks, select_rows

# generate.py's argument defaults (its gen_length, 20480, is a long-reasoning run's: ours is LLaDA's)
DEFAULTS = dict(
    gen_length=128,
    steps=4,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    remasking="low_confidence_dynamic",
    threshold=0.85,
    eb_threshold=0.35,
)
ENTROPY_EPS = 1e-12  # the official entropy's clamp


def transfer_counts(block_length: int, steps: int) -> list[int]:
    """Tokens each step of a block reveals (`get_num_transfer_tokens`): an even split, the
    remainder to the first steps."""
    base, extra = divmod(block_length, steps)
    return [base + (i < extra) for i in range(steps)]


def filtered_logits(logits: Tensor, temperature: float, top_k: int, top_p: float) -> Tensor:
    """(n, V) logits as the official sampler filters them: divided by the temperature (not at 1, nor
    at 0: greedy), top-k and top-p set to -inf."""
    if temperature not in (0, 1):
        logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, top_k)[0][..., -1, None]
        logits = torch.where(logits < kth, torch.full_like(logits, float("-inf")), logits)
    if top_p < 1.0:
        ranked, order = torch.sort(logits, descending=True)
        beyond = torch.cumsum(F.softmax(ranked, dim=-1), dim=-1) > top_p
        beyond[..., 1:] = beyond[..., :-1].clone()
        beyond[..., 0] = False
        drop = torch.scatter(torch.zeros_like(logits, dtype=torch.bool), -1, order, beyond)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_block(logits: Tensor, cfg: GenerationConfig, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(tokens, their probabilities, the sampling distributions) of a block's (n, V) logits: one
    multinomial draw over the rows (greedy at temperature 0)."""
    probs = F.softmax(filtered_logits(logits, cfg.temperature, cfg.top_k, cfg.top_p), dim=-1)
    if cfg.temperature == 0:
        tokens = probs.argmax(dim=-1, keepdim=True)
    else:
        tokens = torch.multinomial(probs, num_samples=1, generator=gen)
    return tokens[:, 0], torch.gather(probs, -1, tokens)[:, 0], probs


def revealed(cfg: GenerationConfig, mask: Tensor, chosen_p: Tensor, probs: Tensor, quota: int) -> Tensor:
    """The block positions a step reveals (a bool (n,) over the block), masked ones only."""
    masked = int(mask.sum())
    transfer = torch.zeros_like(mask)
    if cfg.remasking == "sequential":
        first = int(mask.nonzero()[0])
        transfer[first : first + quota] = True
        return transfer & mask
    if cfg.remasking == "entropy_bounded":
        p = probs.float().clamp_min(ENTROPY_EPS)
        entropy = torch.where(mask, -(p * p.log()).sum(dim=-1), torch.inf)
        ranked, order = torch.sort(entropy, descending=False)
        count = int(torch.searchsorted(torch.cumsum(ranked, 0), torch.tensor(cfg.eb_threshold), right=False))
        transfer[order[: max(1, min(count, masked))]] = True
        return transfer
    return most_confident(mask, chosen_p, quota, cfg.threshold if cfg.remasking == "low_confidence_dynamic" else None)


def most_confident(mask: Tensor, chosen_p: Tensor, quota: int, threshold: float | None = None) -> Tensor:
    """The masked positions a step reveals by confidence: with a `threshold`, every one above it
    when they are at least `quota` (SDAR's low_confidence_dynamic, LLaDA2.x's rule); otherwise the
    `quota` most confident (all that are left, when fewer)."""
    confidence = torch.where(mask, chosen_p, -torch.inf)
    if threshold is not None:
        confident = confidence > threshold
        if int(confident.sum()) >= quota:
            return confident
    transfer = torch.zeros_like(mask)
    transfer[torch.topk(confidence, min(quota, int(mask.sum())))[1]] = True
    return transfer


class SDARSampler(NoLikelihood):
    """SDAR's `block_diffusion_generate`. Settings left unset take generate.py's argument defaults
    (block_length the config's `block_size`, 4 steps a block, temperature 1, no top-k or top-p,
    low_confidence_dynamic at 0.85, an entropy bound of 0.35): like generate.py, not the sampling
    values of generation_config.json, whose EOS ids end the generation."""

    family = SDAR

    def __init__(
        self,
        spec: ArchSpec,
        model_config: dict | None = None,
        generation_config: dict | None = None,
        vocabulary: dict[str, int] | None = None,
    ):
        self.spec, self.mask_id, self.eos_ids = spec, spec.mask_token_id, spec.eos_token_ids

    def resolve(self, cfg: GenerationConfig, prompt_length: int = 0) -> GenerationConfig:
        cfg = cfg.unset(block_length=self.spec.block_size or 4, **DEFAULTS)
        cfg.check_common(SDAR)
        if cfg.top_k > self.spec.vocab_size:
            raise GenerationConfigError(f"top_k ({cfg.top_k}) must be at most the vocabulary ({self.spec.vocab_size})")
        return cfg

    def most_rows(self, cfg: GenerationConfig) -> int:
        return cfg.block_length

    def largest_steps(self, cfg: GenerationConfig, prompt_length: int) -> tuple[StepExtent, StepExtent]:
        """The first step (the prompt's whole blocks and the first block, at least two blocks'
        tokens, its keys those of the longest window: it bounds every step), then a block's first
        step (the block finished before it and this one, against the cache)."""
        block, canvas = cfg.block_length, canvas_length(prompt_length, cfg)
        prefill = prompt_length // block * block
        first = StepExtent(max(prefill, block) + block, canvas, prefill if prefill > block else 0)
        return first, StepExtent(2 * block, canvas)

    def row_bytes(self, cfg: GenerationConfig, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        def reduce(positions: Tensor, logits: Tensor, length: int, gen: torch.Generator) -> None:
            rows = torch.arange(logits.shape[1], device=logits.device)
            tokens, chosen_p, probs = sample_block(gathered(iter([(rows, logits)]), rows, rows.numel()), cfg, gen)
            revealed(cfg, tokens == tokens, chosen_p, probs, 1)

        return measure_row_bytes(reduce, 1, vocab, dtype, device)

    def cache_bytes(self, cfg: GenerationConfig, prompt_length: int, dtype: torch.dtype) -> int:
        return sdar_cache(self.spec, prompt_length, cfg).nbytes(dtype)

    def start(self, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator) -> SDARState:
        return SDARState(self.spec, prompt, cfg, gen)


def gathered(chunks: RowChunks, rows: Tensor, length: int) -> Tensor:
    """(n, V) logits of the hidden rows `rows` of a sequence of `length` tokens, copied out of the
    executor's chunks (a chunk's buffer may be reused by the next)."""
    out = None
    for at, lg in select_rows(chunks, rows, length):
        if out is None:
            out = lg.new_empty((rows.numel(), lg.shape[-1]))
        out[at].copy_(lg[0])
    return out


def canvas_length(prompt_length: int, cfg: GenerationConfig) -> int:
    """The prompt and the answer padded to whole blocks (the official `total_length`)."""
    return -(-(prompt_length + cfg.gen_length) // cfg.block_length) * cfg.block_length


def sdar_cache(spec: ArchSpec, prompt_length: int, cfg: GenerationConfig) -> BlockCache:
    """A request's K/V cache at its largest: every position before the last block (int8 with
    `cache_dtype` int8; "auto" counts as the model's dtype until `LLM.plan` decides)."""
    return BlockCache(spec, canvas_length(prompt_length, cfg) - cfg.block_length, int8=cfg.cache_dtype == "int8")


class SDARState(DenoiseState):
    """One request's block-diffusion decoding: `next_step`, then `advance` with its block's logits."""

    def __init__(self, spec: ArchSpec, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator):
        super().__init__(prompt, cfg, gen, spec.mask_token_id, spec.eos_token_ids)
        total = canvas_length(self.prompt_length, cfg)
        self.x = torch.cat([self.x, self.x.new_full((1, total - self.x.shape[1]), self.mask_id)], dim=1)
        self.cache = sdar_cache(spec, self.prompt_length, cfg)
        self.quota = transfer_counts(cfg.block_length, cfg.steps)
        self.block = self.prompt_length // cfg.block_length  # the first block holding answer positions
        self.first_block = self.block
        self.block_step = 0
        self.cached = 0  # canvas positions [0, cached) are in the cache
        self.rows: Tensor | None = None
        self.length = 0

    @property
    def total_steps(self) -> int:
        """At most: `steps` a block (entropy_bounded: one position a step, at worst)."""
        per_block = self.cfg.block_length if self.cfg.remasking == "entropy_bounded" else self.cfg.steps
        return (self.x.shape[1] // self.cfg.block_length - self.first_block) * per_block

    def block_span(self) -> tuple[int, int]:
        return self.block * self.cfg.block_length, (self.block + 1) * self.cfg.block_length

    def next_step(self) -> StepInput:
        """The block's canvas and every position before it not yet in the cache (stored by this
        pass: the prefill, or the block finished last)."""
        start, end = self.block_span()
        first, block = self.cached, self.cfg.block_length
        if first == 0:
            use = CacheUse(self.cache, refresh=True, keep=start, block=block)
        else:
            use = CacheUse(self.cache, refresh=False, start=first, length=end, keep=start - first, block=block)
        self.rows = torch.arange(start - first, end - first, device=self.x.device)
        self.length = end - first  # the step's tokens
        return StepInput(self.x[:, first:end], self.rows, use)

    def block_logits(self, logits: Callable[[], RowChunks]) -> Tensor:
        """(block, V) logits of the block's positions, from the executor's chunks."""
        return gathered(logits(), self.rows, self.length)

    def propose(self, logits: Callable[[], RowChunks]) -> tuple[Tensor, Tensor]:
        tokens, chosen_p, _ = sample_block(self.block_logits(logits), self.cfg, self.gen)
        return tokens[None], chosen_p[None]

    def advance(self, logits: Callable[[], RowChunks]) -> StepEvent:
        start, end = self.block_span()
        tokens, chosen_p, probs = sample_block(self.block_logits(logits), self.cfg, self.gen)
        block = self.x[0, start:end]  # a view: revealing writes the canvas
        mask = block == self.mask_id
        quota = self.quota[min(self.block_step, len(self.quota) - 1)]  # entropy_bounded may run past steps
        transfer = revealed(self.cfg, mask, chosen_p, probs, quota)
        block[transfer] = tokens[transfer]
        self.cached = start
        self.block_step += 1
        done_block = self.block
        if not (block == self.mask_id).any():
            answer = self.x[0, self.prompt_length : end]
            self.stopped_at_eos = bool(torch.isin(answer, torch.tensor(self.eos_ids, device=answer.device)).any())
            self.block, self.block_step = self.block + 1, 0
        self.steps_run += 1
        self.done = self.stopped_at_eos or self.block * self.cfg.block_length == self.x.shape[1]
        if self.done:
            self.cache.release()
        canvas = self.x[0]
        block_index = done_block - self.first_block
        return StepEvent(
            self.steps_run, self.total_steps, block_index, canvas, self.prompt_length, self.mask_id, int(transfer.sum())
        )

    def result(self) -> DenoiseResult:
        return DenoiseResult(self.x[0], self.steps_run, self.steps_run, self.stopped_at_eos)
