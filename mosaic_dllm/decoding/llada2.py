"""LLaDA2.x's block-diffusion decoding (`LLaDA2MoeModelLM.generate` of its modeling file: the 2.0
release as vendored by the dllm library, yks23/Information-Gain-Sampler at f1cb636), a step at a
time.

The canvas is the prompt and the answer padded to whole blocks of `block_length` from position 0.
From the block that holds the prompt's end (its prompt positions in place), each step runs the
whole canvas up to the block's end, block-causally, with no cache (the official code recomputes
its prefix at every step: so does this, which keeps its bits), samples every position of the block
(one `torch.multinomial` over the block's rows after temperature, top-k and top-p) and reveals
every masked position above `threshold`, or else the step's quota of the most confident ones (an
even split of the block over `min(steps, gen_length // minimal_topk)` steps). A block ends when
none of its positions is masked; the generation ends after a block whose answer so far holds an
EOS, or after the last block; with `stop_at_eos` (its `eos_early_stop`) as soon as a step reveals
an EOS and every answer position before the first EOS is revealed. The answer is the canvas's
first `gen_length` positions after the prompt.

Where the published code is not what it evidently means (README, "LLaDA2.x"): temperature 0 is
greedy (its docstring says so; the code samples at temperature 1), and the early stop looks for
the first EOS of the answer (the code's first EOS of the whole canvas may be the prompt's, and it
then returns the prompt cut there).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..config import LLADA2, GenerationConfig, GenerationConfigError
from ..models.kv_cache import CacheUse
from ..models.spec import ArchSpec
from ..runtime import Executor
from ..tokenizer import Tokenizer
from .common import DenoiseResult, DenoiseState, StepEvent, StepExtent, StepInput, first_eos
from .cost import measure_row_bytes
from .likelihood import LikelihoodOptions
from .rows import RowChunks
from .sdar import canvas_length, gathered, most_confident, sample_block, transfer_counts

# generate()'s argument defaults (its gen_length, 2048, is a long-answer run's: ours is LLaDA's)
DEFAULTS = dict(gen_length=128, steps=32, temperature=0.0, top_k=0, top_p=1.0, threshold=0.95, minimal_topk=1)
NO_LIKELIHOOD = (
    "LLaDA2.x publishes no likelihood estimator: loglikelihood tasks are not supported for it (generation is)"
)


def steps_per_block(cfg: GenerationConfig) -> int:
    """The official `min(steps, gen_length // minimal_topk)`."""
    return min(cfg.steps, cfg.gen_length // cfg.minimal_topk)


def float_logits(chunks: RowChunks, rows: Tensor, length: int) -> Tensor:
    """(n, V) float32 logits of the hidden rows `rows`: the official forward returns its logits
    in float32, and the sampling (temperature, softmax) runs on them."""
    return gathered(chunks, rows, length).float()


class LLaDA2Sampler:
    """LLaDA2.x's `generate`. Settings left unset take its argument defaults (block_length 32,
    32 steps a block, temperature 0, no top-k or top-p, threshold 0.95, minimal_topk 1)."""

    family = LLADA2

    def __init__(
        self,
        spec: ArchSpec,
        model_config: dict | None = None,
        generation_config: dict | None = None,
        vocabulary: dict[str, int] | None = None,
    ):
        self.spec = spec

    def resolve(self, cfg: GenerationConfig, prompt_length: int = 0) -> GenerationConfig:
        cfg = cfg.unset(block_length=self.spec.block_size, **DEFAULTS)
        cfg.check_common(LLADA2)
        if cfg.top_k > self.spec.vocab_size:
            raise GenerationConfigError(f"top_k ({cfg.top_k}) must be at most the vocabulary ({self.spec.vocab_size})")
        if cfg.minimal_topk > cfg.gen_length:
            raise GenerationConfigError(
                f"minimal_topk ({cfg.minimal_topk}) must be at most gen_length ({cfg.gen_length}): "
                "the steps a block are gen_length // minimal_topk at most"
            )
        return cfg

    def guidance_batch(self, cfg: GenerationConfig) -> int:
        return 1

    def most_rows(self, cfg: GenerationConfig) -> int:
        return cfg.block_length

    def largest_steps(self, cfg: GenerationConfig, prompt_length: int) -> tuple[StepExtent, None]:
        """The last block's step, the largest: the whole canvas, block-causally."""
        canvas = canvas_length(prompt_length, cfg)
        return StepExtent(canvas, 0, canvas if canvas > cfg.block_length else 0), None

    def row_bytes(self, cfg: GenerationConfig, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        def reduce(positions: Tensor, logits: Tensor, length: int, gen: torch.Generator) -> None:
            rows = torch.arange(logits.shape[1], device=logits.device)
            tokens, chosen_p, _ = sample_block(float_logits(iter([(rows, logits)]), rows, rows.numel()), cfg, gen)
            most_confident(tokens == tokens, chosen_p, 1, cfg.threshold)

        return measure_row_bytes(reduce, 1, vocab, dtype, device)

    def cache_bytes(self, cfg: GenerationConfig, prompt_length: int, dtype: torch.dtype) -> int:
        return 0  # the official decoding recomputes its prefix: nothing is kept across steps

    def start(self, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator) -> LLaDA2State:
        return LLaDA2State(self.spec, prompt, cfg, gen)

    def first_step(self, state: LLaDA2State) -> StepInput:
        return state.next_step()

    def eval_defaults(self, gen_length: int) -> dict:
        return {}

    def encode_pair(
        self, tokenizer: Tokenizer, context: str, continuation: str, options: LikelihoodOptions
    ) -> tuple[list[int], list[int]]:
        raise ValueError(NO_LIKELIHOOD)

    def window_target(self, target: list[int]) -> list[int]:
        raise ValueError(NO_LIKELIHOOD)

    def log_likelihoods(
        self,
        executor: Executor,
        pairs: list[tuple[Tensor, Tensor]],
        gen: torch.Generator,
        options: LikelihoodOptions,
        cpu_gen: torch.Generator | None = None,
    ) -> list[float]:
        raise ValueError(NO_LIKELIHOOD)


class LLaDA2State(DenoiseState):
    """One request's decoding: `next_step`, then `advance` with its block's logits."""

    def __init__(self, spec: ArchSpec, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator):
        super().__init__(prompt, cfg, gen, spec.mask_token_id, spec.eos_token_ids)
        total = canvas_length(self.prompt_length, cfg)
        self.x = torch.cat([self.x, self.x.new_full((1, total - self.x.shape[1]), self.mask_id)], dim=1)
        self.quota = transfer_counts(cfg.block_length, steps_per_block(cfg))
        self.block = self.first_block = self.prompt_length // cfg.block_length
        self.block_step = 0
        self.rows: Tensor | None = None

    @property
    def total_steps(self) -> int:
        """At most: every block its steps."""
        return (self.x.shape[1] // self.cfg.block_length - self.first_block) * len(self.quota)

    def next_step(self) -> StepInput:
        """The canvas up to the block's end, block-causally, nothing kept; logits of the block's rows."""
        block = self.cfg.block_length
        end = (self.block + 1) * block
        self.rows = torch.arange(end - block, end, device=self.x.device)
        return StepInput(self.x[:, :end], self.rows, CacheUse(None, refresh=True, keep=end, block=block))

    def block_logits(self, logits: Callable[[], RowChunks]) -> Tensor:
        return float_logits(logits(), self.rows, int(self.rows[-1]) + 1)

    def propose(self, logits: Callable[[], RowChunks]) -> tuple[Tensor, Tensor]:
        tokens, chosen_p, _ = sample_block(self.block_logits(logits), self.cfg, self.gen)
        return tokens[None], chosen_p[None]

    def advance(self, logits: Callable[[], RowChunks]) -> StepEvent:
        block_length = self.cfg.block_length
        start, end = self.block * block_length, (self.block + 1) * block_length
        tokens, chosen_p, _ = sample_block(self.block_logits(logits), self.cfg, self.gen)
        block = self.x[0, start:end]  # a view: revealing writes the canvas
        transfer = most_confident(block == self.mask_id, chosen_p, self.quota[self.block_step], self.cfg.threshold)
        block[transfer] = tokens[transfer]
        self.block_step += 1
        self.steps_run += 1
        answer = self.x[0, self.prompt_length : end]  # the official EOS tests read past gen_length too
        eos = first_eos(answer, self.eos_ids)
        ended = False
        if self.cfg.stop_at_eos and eos is not None and torch.isin(tokens[transfer], self.eos_tensor).any():
            ended = not bool((answer[:eos] == self.mask_id).any())
        done_block = self.block
        if not (block == self.mask_id).any():
            self.block, self.block_step = self.block + 1, 0
            ended = ended or eos is not None
        self.stopped_at_eos = ended and eos < self.cfg.gen_length  # an EOS in the answer returned
        self.done = ended or self.block * block_length == self.x.shape[1]
        return StepEvent(
            self.steps_run,
            self.total_steps,
            done_block - self.first_block,
            self.answer_canvas,
            self.prompt_length,
            self.mask_id,
            int(transfer.sum()),
        )

    @property
    def eos_tensor(self) -> Tensor:
        return torch.tensor(self.eos_ids, device=self.x.device)

    @property
    def answer_canvas(self) -> Tensor:
        """The prompt and the first `gen_length` answer positions (what the official code returns
        of its padded canvas)."""
        return self.x[0, : self.prompt_length + self.cfg.gen_length]

    def result(self) -> DenoiseResult:
        return DenoiseResult(self.answer_canvas, self.steps_run, self.steps_run, self.stopped_at_eos)
