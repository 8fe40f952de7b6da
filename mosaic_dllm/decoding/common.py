"""What every sampler shares: the `Sampler` protocol, the step-wise state it starts, step events and
the EOS completion test (the loop that drives states with an executor is `scheduler.py`).

A sampler (one per family: `llada.py`, `dream.py`, `sdar.py`, `llada2.py`) owns everything
family-specific about decoding: its settings (`resolve`), which rows a step reads, the guidance
batch, its temporary bytes per logits row, and the denoising loop as a state that advances one
step at a time given that step's row logits; so requests can be interleaved, and nothing outside
the samplers asks which family runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from ..config import FAMILY_NAMES, GenerationConfig, GenerationConfigError
from ..runtime.executor import Executor, StepInput
from ..tokenizer import Tokenizer
from .likelihood import LikelihoodOptions
from .rows import RowChunks


@dataclass(frozen=True)
class StepEvent:
    step: int  # 1-based, over the whole generation
    total_steps: int  # at most (threshold decoding ends when every position is revealed)
    block: int  # 0-based block index (always 0 for Dream)
    canvas: Tensor  # (L,) current tokens, prompt included; masked positions hold mask_token_id
    prompt_length: int
    mask_token_id: int
    revealed: int  # tokens revealed at this step
    # answer tokens that can no longer change (None: those before the first masked position; a
    # decoding that edits revealed tokens says fewer)
    settled: int | None = None


# Returns False to cancel the generation after this step.
StepCallback = Callable[[StepEvent], bool | None]


class GenerationCancelled(RuntimeError):
    """A step callback asked to stop (for example, the client went away)."""


@dataclass
class DenoiseResult:
    canvas: Tensor  # (L,) final tokens
    forward_passes: int
    steps_run: int
    stopped_at_eos: bool


def initial_canvas(prompt: Tensor, gen_length: int, mask_id: int) -> Tensor:
    """(1, P + gen_length): the prompt followed by mask tokens."""
    x = torch.full((1, prompt.numel() + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[0, : prompt.numel()] = prompt
    return x


def first_eos(tokens: Tensor, eos_ids: tuple[int, ...]) -> int | None:
    hits = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)).nonzero()
    return int(hits[0]) if hits.numel() else None


def answer_complete(canvas: Tensor, prompt_length: int, mask_id: int, eos_ids: tuple[int, ...]) -> bool:
    """True when an EOS is revealed and every generated position before it is revealed too.

    Revealed tokens are never re-masked, so the text before that EOS can no longer change.
    """
    gen = canvas[prompt_length:]
    revealed_eos = torch.isin(gen, torch.tensor(eos_ids, device=gen.device)).nonzero()
    if not revealed_eos.numel():
        return False
    return not bool((gen[: int(revealed_eos[0])] == mask_id).any())


class StepExtent(NamedTuple):
    """What a step's memory depends on beyond its request's batch and rows (`RequestShape`): its
    tokens, the canvas a window's keys span (0: no window), the keys of its block-causal (masked)
    attention call (0: none)."""

    tokens: int
    keys: int = 0
    masked_keys: int = 0


def whole_canvas(cfg: GenerationConfig, prompt_length: int) -> tuple[StepExtent, None]:
    """A full-canvas family's steps: every one the whole canvas, no window, no mask."""
    return StepExtent(prompt_length + cfg.gen_length), None


def check_blocks(cfg: GenerationConfig) -> None:
    """Semi-autoregressive blocks that tile the generation, the steps shared equally among them."""
    if cfg.gen_length % cfg.block_length:
        raise GenerationConfigError(
            f"gen_length ({cfg.gen_length}) must be divisible by block_length ({cfg.block_length})"
        )
    if cfg.steps % cfg.num_blocks:
        raise GenerationConfigError(
            f"steps ({cfg.steps}) must be divisible by the number of blocks "
            f"(gen_length / block_length = {cfg.num_blocks})"
        )


class SamplerState(Protocol):
    done: bool

    def next_step(self) -> StepInput:
        """The next step's canvas batch and rows."""

    def propose(self, logits: Callable[[], RowChunks]) -> tuple[Tensor, Tensor]:
        """The step's reduction of its row logits (tokens and confidences), nothing revealed yet."""

    def advance(self, logits: Callable[[], RowChunks]) -> StepEvent:
        """Run the step given a callable that yields its row logits (called once, or again when the
        sampler must re-read them)."""

    def result(self) -> DenoiseResult: ...


class DenoiseState:
    """What every family's step-wise state keeps: the canvas, the steps run, and the end test."""

    def __init__(self, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator, mask_id: int, eos_ids):
        self.cfg, self.gen, self.mask_id, self.eos_ids = cfg, gen, mask_id, eos_ids
        self.prompt_length = prompt.numel()
        self.x = initial_canvas(prompt, cfg.gen_length, mask_id)
        self.steps_run, self.done, self.stopped_at_eos = 0, False, False

    def finish_step(self, block: int, revealed: int) -> StepEvent:
        """Count the step, decide whether the generation ends, and describe the step."""
        self.steps_run += 1
        canvas = self.x[0]
        self.stopped_at_eos = self.cfg.stop_at_eos and answer_complete(
            canvas, self.prompt_length, self.mask_id, self.eos_ids
        )
        self.done = self.stopped_at_eos or self.finished()
        return StepEvent(self.steps_run, self.total_steps, block, canvas, self.prompt_length, self.mask_id, revealed)

    @property
    def total_steps(self) -> int:
        """The steps the generation takes (at most, when it ends early by its own rule)."""
        return self.cfg.steps

    def finished(self) -> bool:
        """Every step run (official samplers: a fixed number of steps)."""
        return self.steps_run == self.cfg.steps

    def result(self) -> DenoiseResult:
        return DenoiseResult(self.x[0], self.steps_run, self.steps_run, self.stopped_at_eos)


class Sampler(Protocol):
    family: str  # config.LLADA or config.DREAM: which settings it reads (config.SETTINGS)

    def resolve(self, cfg: GenerationConfig, prompt_length: int = 0) -> GenerationConfig:
        """Unset settings filled as the family's official code fills them (the prompt's length may
        matter), every setting checked; raises GenerationConfigError. Idempotent."""

    def guidance_batch(self, cfg: GenerationConfig) -> int:
        """Sequences per step (2 with classifier-free guidance)."""

    def most_rows(self, cfg: GenerationConfig) -> int:
        """The most rows any step reads (the first step's, unless a sampler says otherwise)."""

    def largest_steps(self, cfg: GenerationConfig, prompt_length: int) -> tuple[StepExtent, StepExtent | None]:
        """The request's largest step, then the largest of the steps after its first (None: the
        same): the whole canvas for the full-canvas families (`whole_canvas`); block diffusion's
        first step prefills, the others run a block or two against the cache."""

    def row_bytes(self, cfg: GenerationConfig, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        """Measured temporary bytes per logits row of this sampler with settings `cfg`."""

    def cache_bytes(self, cfg: GenerationConfig, prompt_length: int, dtype: torch.dtype) -> int:
        """Bytes of the block cache a request with settings `cfg` keeps across steps (0: none)."""

    def start(self, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator) -> SamplerState:
        """The state of a request whose resolved settings are `cfg`."""

    def first_step(self, state: SamplerState) -> StepInput:
        """The first step's input, computed without data-dependent ops (predictable on fake tensors)."""

    def eval_defaults(self, gen_length: int) -> dict:
        """Settings the family's official evaluation harness passes with a generation length."""

    def encode_pair(
        self, tokenizer: Tokenizer, context: str, continuation: str, options: LikelihoodOptions
    ) -> tuple[list[int], list[int]]:
        """(prefix, target) ids of a likelihood request, as the family's official harness splits them."""

    def log_likelihoods(
        self,
        executor: Executor,
        pairs: list[tuple[Tensor, Tensor]],
        gen: torch.Generator,
        options: LikelihoodOptions,
        cpu_gen: torch.Generator | None = None,
    ) -> list[float]:
        """Several requests' estimates, each the value it has alone, their copies sharing passes;
        draws on the model's device from `gen`, those the official code makes on the CPU whatever
        the device from `cpu_gen` (None: `gen`)."""

    def window_target(self, target: list[int]) -> list[int]:
        """A rolling (perplexity) window's target as the family's estimator scores it."""


class NoLikelihood:
    """What the samplers of a family that publishes no likelihood estimator (block diffusion) share:
    evaluation's likelihood requests refused with one message; no guidance; no evaluation defaults;
    the first step is the state's next."""

    family: str

    def guidance_batch(self, cfg: GenerationConfig) -> int:
        return 1

    def first_step(self, state: SamplerState) -> StepInput:
        return state.next_step()

    def eval_defaults(self, gen_length: int) -> dict:
        return {}

    def refusal(self) -> ValueError:
        return ValueError(
            f"{FAMILY_NAMES[self.family]} publishes no likelihood estimator: loglikelihood tasks are not "
            "supported for it (generation is)"
        )

    def encode_pair(
        self, tokenizer: Tokenizer, context: str, continuation: str, options: LikelihoodOptions
    ) -> tuple[list[int], list[int]]:
        raise self.refusal()

    def window_target(self, target: list[int]) -> list[int]:
        raise self.refusal()

    def log_likelihoods(
        self,
        executor: Executor,
        pairs: list[tuple[Tensor, Tensor]],
        gen: torch.Generator,
        options: LikelihoodOptions,
        cpu_gen: torch.Generator | None = None,
    ) -> list[float]:
        raise self.refusal()
