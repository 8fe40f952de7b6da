"""LLaDA / LLaDA-MoE denoising with the official semantics (ML-GSAI/LLaDA generate.py).

Semi-autoregressive blocks; per block a fixed quota of tokens per step; x0 from argmax (or float64
Gumbel-max at temperature > 0); confidence from a softmax in the logits' dtype or uniform noise;
positions after the current block never compete; the top-k of the quota is revealed.

A step reads the masked positions up to the end of the current block: the official code gives
every other position a confidence of -inf, so they never win. An executor may give logits for more
positions (the eager one gives all, as the official code computes them); they are reduced the same
way and never revealed.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import Tensor

from ..config import LLADA, GenerationConfig, GenerationConfigError, check_stored
from ..models.spec import ArchSpec
from ..runtime import Executor
from ..tokenizer import Tokenizer
from .common import DenoiseState, StepEvent, StepExtent, StepInput, check_blocks, whole_canvas
from .cost import measure_row_bytes
from .likelihood import LikelihoodOptions, batched_estimates, llada_runs
from .parallel import ParallelLLaDAState, block_cache
from .rows import RowChunks, cfg_combine, propose
from .schedule import llada_transfer_counts

LLADA_SETTINGS = ("gen_length", "steps", "block_length", "temperature", "cfg_scale", "remasking")
ALIASES = {"max_new_tokens": "gen_length"}  # the name generation_config.json uses
END_OF_TURN = "<|eot_id|>"  # LLaDA's chat end-of-turn token


def guidance_batch(x: Tensor, prompt_index: Tensor, mask_id: int, cfg_scale: float) -> Tensor:
    """The canvas, plus for CFG an unconditional copy with the prompt replaced by the mask token."""
    if cfg_scale <= 0:
        return x
    un_x = x.clone()
    un_x[prompt_index] = mask_id
    return torch.cat([x, un_x], dim=0)


class LLaDASampler:
    """The official LLaDA sampler (also LLaDA-MoE's): blocks, remasking, classifier-free guidance.

    The official `generate` takes explicit arguments and reads no config; settings left unset take
    the checkpoint's generation_config.json (our convention, e.g. the default model's 32/32/8; its
    steps and block_length only where they fit the request's gen_length), then: gen_length 128,
    steps = gen_length, one block, temperature 0, no guidance, low_confidence remasking.
    """

    family = LLADA

    def __init__(
        self,
        spec: ArchSpec,
        model_config: dict | None = None,
        generation_config: dict | None = None,
        vocabulary: dict[str, int] | None = None,
    ):
        self.spec = spec
        self.mask_id, self.eos_ids, self.vocab = spec.mask_token_id, spec.eos_token_ids, spec.vocab_size
        self.eot_id = (vocabulary or {}).get(END_OF_TURN)  # for confidence_eos_eot_inf
        stored = dict(generation_config or {})
        check_stored({k: stored.get(k) for k in (*LLADA_SETTINGS, "max_new_tokens")}, "generation_config.json", ALIASES)
        if "max_new_tokens" in stored:
            stored.setdefault("gen_length", stored["max_new_tokens"])
        self.defaults = {k: stored[k] for k in LLADA_SETTINGS if stored.get(k) is not None}

    def resolve(self, cfg: GenerationConfig, prompt_length: int = 0) -> GenerationConfig:
        stored = self.defaults
        cfg = cfg.unset(gen_length=stored.get("gen_length", 128))
        if isinstance(cfg.gen_length, int) and cfg.gen_length > 0:  # stored shapes only where they fit
            block = stored.get("block_length")
            if block and cfg.gen_length % block == 0:
                cfg = cfg.unset(block_length=block)
            cfg = cfg.unset(block_length=cfg.gen_length)
            steps, blocks = stored.get("steps"), cfg.gen_length // cfg.block_length if cfg.block_length else 0
            if steps and steps <= cfg.gen_length and blocks and steps % blocks == 0:
                cfg = cfg.unset(steps=steps)
            cfg = cfg.unset(steps=cfg.gen_length)
        cfg = cfg.unset(**{k: stored[k] for k in ("temperature", "cfg_scale", "remasking") if k in stored})
        cfg = cfg.unset(temperature=0.0, cfg_scale=0.0, remasking="low_confidence")
        cfg = cfg.unset(logits_eos_inf=False, confidence_eos_eot_inf=False)
        cfg.check_common(LLADA)

        def fail(msg: str) -> None:
            raise GenerationConfigError(msg)

        if cfg.steps > cfg.gen_length:
            fail(f"steps ({cfg.steps}) must be at most gen_length ({cfg.gen_length}): more steps would reveal nothing")
        check_blocks(cfg)
        if cfg.parallel and cfg.cfg_scale > 0:
            fail("threshold / factor / cache follow Fast-dLLM, which has no classifier-free guidance: set cfg_scale 0")
        if cfg.parallel and (cfg.logits_eos_inf or cfg.confidence_eos_eot_inf):
            fail("logits_eos_inf / confidence_eos_eot_inf are options of LLaDA's official sampler; Fast-dLLM has none")
        if cfg.confidence_eos_eot_inf and self.eot_id is None:
            fail(f"confidence_eos_eot_inf needs the end-of-turn token {END_OF_TURN}, which this tokenizer lacks")
        return cfg

    def never(self, cfg: GenerationConfig) -> tuple[int, ...]:
        """Tokens whose logits are -inf before x0 is chosen (logits_eos_inf: EOS)."""
        return self.eos_ids[:1] if cfg.logits_eos_inf else ()

    def unranked(self, cfg: GenerationConfig) -> tuple[int, ...]:
        """Tokens whose logits are -inf in the confidence's softmax once x0 is chosen: the official
        confidence_eos_eot_inf sets end-of-turn's, and EOS's through the noisy logits, which at
        temperature 0 are the logits themselves."""
        if not cfg.confidence_eos_eot_inf:
            return ()
        return (self.eot_id, *self.eos_ids[:1]) if cfg.temperature == 0 else (self.eot_id,)

    def guidance_batch(self, cfg: GenerationConfig) -> int:
        return 2 if cfg.cfg_scale > 0 else 1

    def most_rows(self, cfg: GenerationConfig) -> int:
        """A block's masked positions; with the dual cache's cap on steps (threshold or factor),
        a later block's first step also reads what each earlier block may leave: at least one
        position is revealed a pass, so at most block_length - steps / blocks each."""
        leftover = 0
        if cfg.cache == "dual" and (cfg.threshold is not None or cfg.factor is not None):
            leftover = (cfg.num_blocks - 1) * max(0, cfg.block_length - cfg.steps // cfg.num_blocks)
        return cfg.block_length + leftover

    def largest_steps(self, cfg: GenerationConfig, prompt_length: int) -> tuple[StepExtent, None]:
        return whole_canvas(cfg, prompt_length)

    def row_bytes(self, cfg: GenerationConfig, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        softmax_dtype = torch.float64 if cfg.parallel else None  # Fast-dLLM's confidences are float64

        def reduce(positions: Tensor, logits: Tensor, length: int, gen: torch.Generator) -> None:
            canvas = torch.zeros((1, length), dtype=torch.long, device=device)
            chunk = cfg_combine(cfg.cfg_scale)(logits)
            propose(
                iter([(positions, chunk)]),
                canvas,
                vocab,
                cfg.temperature,
                cfg.remasking,
                gen,
                None,
                softmax_dtype,
                never=self.never(cfg),
                unranked=self.unranked(cfg),
            )

        return measure_row_bytes(reduce, self.guidance_batch(cfg), vocab, dtype, device)

    def eval_defaults(self, gen_length: int) -> dict:
        """What LLaDA's harness passes with a generation length (`eval_llada.py`): one block, a
        step a token."""
        return {"steps": gen_length, "block_length": gen_length}

    def encode_pair(
        self, tokenizer: Tokenizer, context: str, continuation: str, options: LikelihoodOptions
    ) -> tuple[list[int], list[int]]:
        """As LLaDA's harness: trailing spaces of the context start the continuation; the
        continuation's ids are the whole text's beyond the context's."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = tokenizer.encode(context + continuation)
        prefix = tokenizer.encode(context) if context else []
        return prefix, whole[len(prefix) :]

    def window_target(self, target: list[int]) -> list[int]:
        """A rolling window's target as the estimator takes it: as is."""
        return target

    def log_likelihoods(
        self,
        executor: Executor,
        pairs: list[tuple[Tensor, Tensor]],
        gen: torch.Generator,
        options: LikelihoodOptions,
        cpu_gen: torch.Generator | None = None,
    ) -> list[float]:
        """LLaDA's official estimates of several requests, each its value alone, passes shared; the
        permutations from `cpu_gen` (the official script draws them on the CPU)."""
        draw = partial(llada_runs, mask_id=self.mask_id, cpu_gen=cpu_gen)
        return batched_estimates(executor, pairs, draw, gen, options)

    def cache_bytes(self, cfg: GenerationConfig, prompt_length: int, dtype: torch.dtype) -> int:
        cache = block_cache(self.spec, prompt_length, cfg)
        return cache.nbytes(dtype) if cache is not None else 0

    def start(self, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator) -> LLaDAState | ParallelLLaDAState:
        if cfg.parallel:
            return ParallelLLaDAState(self.spec, prompt, cfg, gen)
        return LLaDAState(self, prompt, cfg, gen)

    def first_step(self, state: LLaDAState | ParallelLLaDAState) -> StepInput:
        p = state.prompt_length
        state.rows = torch.arange(p, p + state.cfg.block_length, device=state.x.device)
        return StepInput(state.guidance_ids(), state.rows)


class LLaDAState(DenoiseState):
    """One request's denoising, a step at a time: `next_step`, then `advance` with its logits."""

    def __init__(self, sampler: LLaDASampler, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator):
        super().__init__(prompt, cfg, gen, sampler.mask_id, sampler.eos_ids)
        self.sampler = sampler
        self.prompt_index = self.x != sampler.mask_id
        self.steps_per_block = cfg.steps // cfg.num_blocks
        self.quota: Tensor | None = None
        self.rows: Tensor | None = None  # the rows the current step reads

    @property
    def block(self) -> int:
        return self.steps_run // self.steps_per_block

    def guidance_ids(self) -> Tensor:
        return guidance_batch(self.x, self.prompt_index, self.sampler.mask_id, self.cfg.cfg_scale)

    def next_step(self) -> StepInput:
        start = self.prompt_length + self.block * self.cfg.block_length
        end = start + self.cfg.block_length
        if self.steps_run % self.steps_per_block == 0:  # a block starts: its quota per step
            self.quota = llada_transfer_counts(self.x[:, start:end] == self.sampler.mask_id, self.steps_per_block)
        self.rows = (self.x[0, :end] == self.sampler.mask_id).nonzero().flatten()  # masked, up to the block's end
        return StepInput(self.guidance_ids(), self.rows)

    def propose(self, logits: Callable[[], RowChunks]) -> tuple[Tensor, Tensor]:
        """x0 and confidence (1, L) of the step, from its row logits (guidance combined per chunk)."""
        cfg, combine = self.cfg, cfg_combine(self.cfg.cfg_scale)
        chunks = ((rows, combine(lg)) for rows, lg in logits())
        sampler = self.sampler
        return propose(
            chunks,
            self.x,
            sampler.vocab,
            cfg.temperature,
            cfg.remasking,
            self.gen,
            self.rows,
            never=sampler.never(cfg),
            unranked=sampler.unranked(cfg),
        )

    def advance(self, logits: Callable[[], RowChunks]) -> StepEvent:
        cfg, mask_id, x = self.cfg, self.sampler.mask_id, self.x
        end = self.prompt_length + (self.block + 1) * cfg.block_length
        i = self.steps_run % self.steps_per_block
        x0, x0_p = self.propose(logits)
        mask_index = x == mask_id
        x0_p[:, end:] = -torch.inf
        x0 = torch.where(mask_index, x0, x)
        confidence = torch.where(mask_index, x0_p, -torch.inf)
        transfer = torch.zeros_like(x0, dtype=torch.bool)
        for row in range(confidence.shape[0]):
            _, chosen = torch.topk(confidence[row], k=int(self.quota[row, i]))
            transfer[row, chosen] = True
        x[transfer] = x0[transfer]
        return self.finish_step(self.block, int(transfer.sum()))
