"""Dream denoising with the official semantics (Dream-org generation_utils.py, `_sample`).

One canvas, timesteps linspace(1, eps, steps + 1); logits shifted right by one position; `origin`
reveals each masked token with probability 1 - s/t; the other algorithms rank masked positions by
max probability, top1 - top2 margin or negative entropy and reveal int(n * (1 - s/t)) of them.

A step reads the masked positions (origin: the masked positions drawn for this step); the hidden
state at p - 1 gives the logits of p (`ArchSpec.logit_shift`). The Mosaic executor computes only
those rows, chunk by chunk; the eager one every row, from which they are gathered as the official
code gathers them. The per-row maths is the official one.

Fast-dLLM's samplers (opt-in, approximations of the official one): `ThresholdDreamState` (one
canvas, alg confidence_threshold, no cache) and `BlockDreamState` (blocks with a prefix or dual cache).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ..config import DREAM, THRESHOLD_ALG, GenerationConfig, GenerationConfigError, check_stored
from ..models.spec import ArchSpec
from ..runtime import Executor
from ..tokenizer import Tokenizer
from .common import DenoiseState, StepEvent, StepExtent, StepInput, check_blocks, whole_canvas
from .cost import measure_row_bytes
from .dream_sampling import sample_rows, sample_tokens
from .likelihood import LikelihoodOptions, batched_estimates, dream_runs
from .parallel import BlockState, block_cache, ranked_threshold
from .rows import PositionLogits, RowChunks, select_rows
from .schedule import dream_timesteps, dream_transfer_count

FAST_DLLM_THRESHOLD = 0.9  # Fast-dLLM's diffusion_generate default


# transformers 4.46 (Dream's pinned version) gives every model config these generation attributes,
# from config.json or these legacy defaults (`PretrainedConfig._get_global_generation_defaults`).
LEGACY_CONFIG_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "max_length": 20}
# DreamGenerationConfig's own defaults, for what the model config leaves unset (or None).
DREAM_CONFIG_DEFAULTS = {
    "temperature": 0.0,
    "top_p": None,
    "top_k": None,
    "max_length": 20,
    "max_new_tokens": None,
    "eps": 1e-3,
    "steps": 512,
    "alg": "origin",
    "alg_temp": None,
}


def official_defaults(model_config: dict) -> dict:
    """What Dream's `diffusion_generate(ids, **kwargs)` uses for every setting the call leaves out.

    It builds its settings with `DreamGenerationConfig.from_model_config(model.config)`: the model
    config's attributes (config.json's keys, and the legacy defaults above for the generation keys
    it lacks), None values dropped, DreamGenerationConfig's defaults for the rest; the call's
    keyword arguments then override. generation_config.json is not read on this path.
    """
    values = {k: model_config.get(k, v) for k, v in LEGACY_CONFIG_DEFAULTS.items()}
    values |= {k: model_config[k] for k in DREAM_CONFIG_DEFAULTS if k in model_config}
    return DREAM_CONFIG_DEFAULTS | {k: v for k, v in values.items() if v is not None}


class DreamSampler:
    """The official Dream sampler (`_sample`): one canvas, timesteps, four ranking algorithms.

    Settings left unset resolve as the official call resolves them (`official_defaults`): e.g.
    temperature 1.0, top_k 50 and 512 steps unless config.json says otherwise, and a generation
    length of 20 tokens (capped by the context) when neither the call nor the config gives one.
    """

    family = DREAM

    def __init__(
        self,
        spec: ArchSpec,
        model_config: dict | None = None,
        generation_config: dict | None = None,
        vocabulary: dict[str, int] | None = None,
    ):
        self.spec = spec
        self.mask_id, self.eos_ids, self.shift = spec.mask_token_id, spec.eos_token_ids, spec.logit_shift
        self.context = spec.max_position_embeddings
        stored = {k: (model_config or {}).get(k) for k in (*LEGACY_CONFIG_DEFAULTS, *DREAM_CONFIG_DEFAULTS)}
        check_stored(stored, "config.json", {"max_new_tokens": "gen_length", "max_length": "gen_length"})
        self.defaults = official_defaults(model_config or {})

    def resolve(self, cfg: GenerationConfig, prompt_length: int = 0) -> GenerationConfig:
        d = self.defaults
        if d["max_new_tokens"] is not None:
            gen_length = d["max_new_tokens"]
        elif d["max_length"] == DREAM_CONFIG_DEFAULTS["max_length"]:  # 20 new tokens, within the context
            gen_length = min(d["max_length"] + prompt_length, self.context) - prompt_length
        else:  # a configured max_length counts the prompt
            gen_length = d["max_length"] - prompt_length

        def fail(msg: str) -> None:
            raise GenerationConfigError(msg)

        if (cfg.alg or d["alg"]) == THRESHOLD_ALG:
            cfg = cfg.unset(threshold=FAST_DLLM_THRESHOLD)
        if self.blocks(cfg):  # Fast-dLLM's block sampler: entropy, or by threshold
            block_alg = THRESHOLD_ALG if cfg.threshold is not None else "entropy"
            if cfg.alg not in (None, block_alg):
                fail(
                    "Fast-dLLM's Dream block sampler ranks by entropy (alg entropy), or with a threshold by "
                    f"confidence (alg {THRESHOLD_ALG}); got alg {cfg.alg!r}"
                )
            cfg = replace(cfg, alg=block_alg)
        elif cfg.threshold is not None:  # Fast-dLLM's one-canvas sampler (generation_utils.py)
            if cfg.alg not in (None, THRESHOLD_ALG):
                fail(f"a threshold without a cache is Fast-dLLM's alg {THRESHOLD_ALG}; got alg {cfg.alg!r}")
            cfg = replace(cfg, alg=THRESHOLD_ALG)
        cfg = cfg.unset(gen_length=gen_length, **{k: d[k] for k in ("steps", "temperature", "top_p", "top_k")})
        cfg = cfg.unset(alg=d["alg"], alg_temp=d["alg_temp"], eps=d["eps"])
        cfg = cfg.unset(top_k=0)  # the official None (no top-k); 0 so that resolving again keeps it
        cfg.check_common(DREAM)

        most = max(cfg.gen_length, DREAM_CONFIG_DEFAULTS["steps"])
        if cfg.steps > most:
            fail(f"steps ({cfg.steps}) must be at most {most} (the larger of gen_length and Dream's default 512)")
        if self.blocks(cfg):
            self.check_block_sampler(cfg)
        elif cfg.block_length not in (None, cfg.gen_length):
            fail(
                "Dream's official sampler and Fast-dLLM's threshold sampler without a cache have no blocks: "
                "leave block_length unset (or equal to gen_length), or set cache prefix or dual"
            )
        elif cfg.alg == THRESHOLD_ALG and cfg.gen_length % cfg.steps:
            fail(
                f"alg {THRESHOLD_ALG} reveals gen_length / steps a step: steps ({cfg.steps}) must divide "
                f"gen_length ({cfg.gen_length})"
            )
        return cfg

    @staticmethod
    def blocks(cfg: GenerationConfig) -> bool:
        """Whether Fast-dLLM's block sampler runs (`generation_utils_block.py`: it always keeps a cache)."""
        return cfg.cache not in (None, "none")

    @staticmethod
    def check_block_sampler(cfg: GenerationConfig) -> None:
        """Fast-dLLM's Dream sampler (`generation_utils_block.py`): blocks, always a cache."""
        if cfg.block_length is None:
            raise GenerationConfigError("a Dream block cache needs blocks: set block_length (Fast-dLLM uses 32)")
        check_blocks(cfg)

    def guidance_batch(self, cfg: GenerationConfig) -> int:
        return 1

    def most_rows(self, cfg: GenerationConfig) -> int:
        return cfg.gen_length

    def largest_steps(self, cfg: GenerationConfig, prompt_length: int) -> tuple[StepExtent, None]:
        return whole_canvas(cfg, prompt_length)

    def row_bytes(self, cfg: GenerationConfig, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        def reduce(positions: Tensor, logits: Tensor, length: int, gen: torch.Generator) -> None:
            sample_tokens(logits[0], cfg.temperature, cfg.top_p, cfg.top_k, gen, **ranking(cfg))

        return measure_row_bytes(reduce, 1, vocab, dtype, device)

    def eval_defaults(self, gen_length: int) -> dict:
        """Nothing beyond the generation length: the rest resolves as the official call."""
        return {}

    def encode_pair(
        self, tokenizer: Tokenizer, context: str, continuation: str, options: LikelihoodOptions
    ) -> tuple[list[int], list[int]]:
        """As Dream's evaluation (`eval/eval.py` `_encode_pair`): BOS text before the context when
        `add_bos_token`, trailing spaces moved to the continuation, EOS after the whole, the context
        cut on the left when the whole passes `max_length`."""
        if options.add_bos_token:
            if tokenizer.bos_text is None:
                raise ValueError("add_bos_token: this tokenizer has no BOS token")
            context = tokenizer.bos_text + context
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = tokenizer.encode(context + continuation) + [self.eos_ids[0]]
        prefix = tokenizer.encode(context)
        target = whole[len(prefix) :]
        cutoff = max(len(whole) - options.max_length, 0)
        if cutoff:
            keep = len(prefix) - cutoff
            prefix, target = (prefix[-keep:], target) if keep > 0 else ([], whole[-options.max_length :])
        return prefix, target

    def window_target(self, target: list[int]) -> list[int]:
        """A rolling window's target with EOS appended, as Dream's likelihood appends it (its last
        position is never masked)."""
        return [*target, self.eos_ids[0]]

    def log_likelihoods(
        self,
        executor: Executor,
        pairs: list[tuple[Tensor, Tensor]],
        gen: torch.Generator,
        options: LikelihoodOptions,
        cpu_gen: torch.Generator | None = None,
    ) -> list[float]:
        """Dream's evaluation's estimates of several requests, each its value alone, passes shared
        (every draw on the model's device, as its eval.py: `cpu_gen` is unused)."""
        draw = partial(dream_runs, mask_id=self.mask_id)
        return batched_estimates(executor, pairs, draw, gen, options, by_length=options.log_type == "union")

    def cache_bytes(self, cfg: GenerationConfig, prompt_length: int, dtype: torch.dtype) -> int:
        cache = block_cache(self.spec, prompt_length, cfg)
        return cache.nbytes(dtype) if cache is not None else 0

    def hidden_rows(self, positions: Tensor) -> Tensor:
        """The hidden rows whose logits are those of `positions`."""
        return (positions - 1).clamp(min=0) if self.shift else positions

    def start(self, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator) -> DreamState | BlockDreamState:
        if self.blocks(cfg):
            return BlockDreamState(self, prompt, cfg, gen)
        if cfg.alg == THRESHOLD_ALG:
            return ThresholdDreamState(self, prompt, cfg, gen)
        return DreamState(self, prompt, cfg, gen)

    def first_step(self, state: DreamState) -> StepInput:
        if state.cfg.alg == "origin":
            raise ValueError("the first step of alg origin reads a random subset of rows; use maskgit_plus")
        state.positions = torch.arange(state.prompt_length, state.x.shape[1], device=state.x.device)
        return StepInput(state.x, self.hidden_rows(state.positions))


def ranking(cfg: GenerationConfig) -> dict:
    return {"margin_confidence": cfg.alg == "topk_margin", "neg_entropy": cfg.alg == "entropy"}


class DreamState(DenoiseState):
    """One request's denoising, a step at a time: `next_step`, then `advance` with its logits."""

    def __init__(self, sampler: DreamSampler, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator):
        super().__init__(prompt, cfg, gen, sampler.mask_id, sampler.eos_ids)
        self.sampler = sampler
        self.timesteps = dream_timesteps(cfg.steps, cfg.eps, self.x.device)
        self.positions = self.chosen = None

    def next_step(self) -> StepInput:
        """The masked positions; origin draws which of them this step reveals (before the forward
        pass in the official code too, which consumes no randomness)."""
        i, x = self.steps_run, self.x
        masked = (x[0] == self.sampler.mask_id).nonzero().flatten()
        self.positions, self.chosen = masked, None
        if self.cfg.alg == "origin":
            t, s = self.timesteps[i], self.timesteps[i + 1]
            p_transfer = 1 - s / t if i < self.cfg.steps - 1 else 1
            self.chosen = torch.rand(masked.numel(), generator=self.gen, device=x.device) < p_transfer
            self.positions = masked[self.chosen]
        return StepInput(x, self.sampler.hidden_rows(self.positions))

    def propose(self, logits: Callable[[], RowChunks]) -> tuple[Tensor, Tensor]:
        """Confidence and x0 of the step's positions, from its row logits, as the official
        sample_tokens over the gathered rows."""
        wanted, cfg = self.sampler.hidden_rows(self.positions), self.cfg

        def rows() -> PositionLogits:
            return ((self.positions[part], lg[0]) for part, lg in select_rows(logits(), wanted, self.x.shape[1]))

        return sample_rows(rows, self.gen, cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, **ranking(cfg))

    def advance(self, logits: Callable[[], RowChunks]) -> StepEvent:
        cfg, x, mask_id, i = self.cfg, self.x, self.sampler.mask_id, self.steps_run
        mask_index = x == mask_id
        before = int(mask_index.sum())
        confidence, x0 = self.propose(logits)
        if cfg.alg == "origin":
            tokens = torch.zeros_like(x[mask_index]) + mask_id
            tokens[self.chosen] = x0
            x[mask_index] = tokens.clone()
        else:
            n = dream_transfer_count(mask_index, i, cfg.steps, self.timesteps)
            full_confidence = torch.full_like(x, -torch.inf, dtype=confidence.dtype)
            full_confidence[mask_index] = confidence
            if n > 0:
                if cfg.alg_temp is None or cfg.alg_temp == 0:
                    _, transfer = torch.topk(full_confidence, n)
                else:
                    weights = F.softmax(full_confidence / cfg.alg_temp, dim=-1)
                    transfer = torch.multinomial(weights, num_samples=n, generator=self.gen)
                x_ = torch.zeros_like(x) + mask_id
                x_[mask_index] = x0.clone()
                batch = torch.arange(x.size(0), device=x.device).unsqueeze(1).expand_as(transfer)
                x[batch, transfer] = x_[batch, transfer]
        return self.finish_step(0, before - int((x == mask_id).sum()))


class ThresholdDreamState(DreamState):
    """Fast-dLLM's one-canvas threshold sampler (dream/model/generation_utils.py, alg
    confidence_threshold, no cache), a step at a time.

    An approximation of the official sampler, exact to Fast-dLLM. Each step samples every masked
    position as the official maskgit_plus does (confidence: the sampled token's probability) and
    takes the top n + d: n = masked / steps, d the positions deferred by the step before. Of those,
    the first is revealed always, the others at or above `threshold`; the rest are deferred. On the
    last step each deferral adds a step (and n becomes 0), so the generation ends with every
    position revealed, in at most gen_length steps.
    """

    def __init__(self, sampler: DreamSampler, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator):
        super().__init__(sampler, prompt, cfg, gen)
        self.per_step = int((self.x == self.mask_id).sum()) // cfg.steps
        self.deferred = 0
        self.steps = cfg.steps  # grows on the last step, once per deferral

    @property
    def total_steps(self) -> int:
        return self.cfg.gen_length

    def finished(self) -> bool:
        return self.steps_run == self.steps

    def advance(self, logits: Callable[[], RowChunks]) -> StepEvent:
        x, mask_id = self.x, self.mask_id
        mask_index = x == mask_id
        before = int(mask_index.sum())
        confidence, x0 = self.propose(logits)
        full = torch.full_like(x, -torch.inf, dtype=confidence.dtype)
        full[mask_index] = confidence
        count, self.deferred = self.per_step + self.deferred, 0
        values, chosen = torch.topk(full, count)
        keep = torch.ones(count, dtype=torch.bool, device=x.device)
        for k in range(1, count):
            if values[0, k] < self.cfg.threshold:
                keep[k] = False
                self.deferred += 1
                if self.steps_run == self.steps - 1:
                    self.per_step, self.steps = 0, self.steps + 1
        x_ = torch.zeros_like(x) + mask_id
        x_[mask_index] = x0.clone()
        revealed = chosen[0, keep]
        x[0, revealed] = x_[0, revealed]
        return self.finish_step(0, before - int((x == mask_id).sum()))


class BlockDreamState(BlockState):
    """Fast-dLLM's Dream block sampler (dream/model/generation_utils_block.py), a step at a time.

    An approximation of the official sampler, exact to Fast-dLLM. Per block: a step over the whole
    canvas refreshes the cache and reveals the block's first position alone (sampled over every
    row, as the reference samples them); then steps over a window (the block and all after it, or
    the block alone with `dual`), whose logits are shifted within the window (its first position
    reads its own row). Each window step reveals, of the block's masked positions, every one at or
    above `threshold` (at least one), or by negative entropy the official quota of the block's
    timesteps; a block runs at most `steps / blocks` steps.
    """

    def __init__(self, sampler: DreamSampler, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator):
        super().__init__(sampler.spec, prompt, cfg, gen)
        self.sampler = sampler
        self.timesteps = dream_timesteps(self.steps_per_block, cfg.eps, self.x.device)
        self.positions: Tensor | None = None  # window positions whose logits the step reads

    def next_step(self) -> StepInput:
        start, _ = self.block_span()
        use = self.cache_use()
        if self.block_step == 0:  # the whole canvas; every row sampled when sampling draws randomness
            every = self.cfg.temperature > 0
            self.positions = torch.arange(self.x.shape[1]) if every else torch.tensor([start])
        else:
            masked = self.x[0, self.window[0] : self.window[1]] == self.mask_id
            if self.cfg.threshold is None:
                masked[self.cfg.block_length :] = False
            self.positions = masked.nonzero().flatten()
        self.positions = self.positions.to(self.x.device)
        w0, w1 = self.window
        return StepInput(self.x[:, w0:w1], self.wanted(), use)

    def wanted(self) -> Tensor:
        """The hidden rows the step reads: each position's, each row once (every position of the
        canvas reads rows 0 .. L - 2, position 0 and 1 both row 0; see `propose`)."""
        if self.sampler.shift and self.positions.numel() == self.window[1] - self.window[0]:
            return self.positions[:-1]
        return self.sampler.hidden_rows(self.positions)

    def propose(self, logits: Callable[[], RowChunks]) -> tuple[Tensor, Tensor]:
        cfg, w0, w1 = self.cfg, *self.window
        wanted = self.wanted()
        every = wanted.numel() < self.positions.numel()  # every position: row 0 read twice, in order

        def rows() -> PositionLogits:
            for part, lg in select_rows(logits(), wanted, w1 - w0):
                if every and part.start == 0:
                    yield self.positions[:1], lg[0, :1]
                yield (wanted[part] + 1, lg[0]) if every else (self.positions[part], lg[0])

        rank = {"neg_entropy": True} if self.block_step and cfg.threshold is None else {}
        return sample_rows(rows, self.gen, cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k, **rank)

    def advance(self, logits: Callable[[], RowChunks]) -> StepEvent:
        cfg, mask_id = self.cfg, self.sampler.mask_id
        start, end = self.block_span()
        w0, w1 = self.window
        confidence, x0 = self.propose(logits)
        window = self.x[0, w0:w1]  # a view: revealing writes the canvas
        before = int((self.x[0, start:end] == mask_id).sum())
        if self.block_step == 0:
            window[start] = x0[self.positions == start][0]
        else:
            full = torch.full((w1 - w0,), -torch.inf, dtype=confidence.dtype, device=window.device)
            full[self.positions] = confidence
            full[cfg.block_length :] = -torch.inf
            if cfg.threshold is not None:
                chosen = ranked_threshold(full, before, cfg.threshold)
            else:
                mask = torch.zeros_like(window, dtype=torch.bool)
                mask[self.positions] = True
                n = dream_transfer_count(mask[None], self.block_step, self.steps_per_block, self.timesteps)
                chosen = self.positions[:0]
                if n > 0 and (cfg.alg_temp is None or cfg.alg_temp == 0):
                    chosen = torch.topk(full, n)[1]
                elif n > 0:
                    weights = F.softmax(full / cfg.alg_temp, dim=-1)
                    chosen = torch.multinomial(weights, num_samples=n, generator=self.gen)
            proposal = torch.full_like(window, mask_id)
            proposal[self.positions] = x0
            window[chosen] = proposal[chosen]
        quota_spent = cfg.threshold is None and self.block_step + 1 == self.steps_per_block
        done = quota_spent or not (self.x[0, start:end] == mask_id).any()  # the reference moves on
        return self.end_step(done, before - int((self.x[0, start:end] == mask_id).sum()))
