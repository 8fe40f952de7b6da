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
none of its positions is masked (or its steps ran out, which only a drawn mask token allows); the
generation ends after a block whose answer so far holds an EOS, or after the last block; with
`stop_at_eos` (its `eos_early_stop`) as soon as a step reveals an EOS and every answer position
before the first EOS is revealed. The answer is the canvas's first `gen_length` positions after
the prompt.

With `editing_threshold` set, LLaDA2.1's `generate` (its modeling file as the dllm library vendors
it: lingjiechen2/dllm `dllm/pipelines/llada21/models/modeling_llada21_moe.py` at 7520f3c): a step
reveals the masked positions above `threshold` (at least `num_to_transfer`, the most confident)
and replaces each revealed answer token of the block whose new draw differs with a confidence above
`editing_threshold`; a block ends after a step that found nothing masked and edited nothing, or
after `max_post_steps` steps with nothing masked; `steps` and `minimal_topk` play no part; EOS
ends it only with `stop_at_eos`, after a block, once nothing is masked. Its temperature 0 is the
argmax of the unfiltered logits.

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
from .common import DenoiseResult, DenoiseState, NoLikelihood, StepEvent, StepExtent, StepInput, first_eos
from .cost import measure_row_bytes
from .rows import RowChunks
from .sdar import canvas_length, gathered, most_confident, sample_block, transfer_counts

# generate()'s argument defaults (its gen_length, 2048, is a long-answer run's: ours is LLaDA's)
DEFAULTS = dict(gen_length=128, steps=32, temperature=0.0, top_k=0, top_p=1.0, threshold=0.95, minimal_topk=1)
# LLaDA2.1's generate: its editing settings' defaults (the others are 2.0's)
EDITING_DEFAULTS = dict(max_post_steps=16, num_to_transfer=1)


def steps_per_block(cfg: GenerationConfig) -> int:
    """The official `min(steps, gen_length // minimal_topk)`."""
    return min(cfg.steps, cfg.gen_length // cfg.minimal_topk)


def sample_editing(logits: Tensor, cfg: GenerationConfig, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor | None]:
    """LLaDA2.1's draw: at temperature 0 the argmax of the logits with its softmax probability
    (top-k and top-p not applied); otherwise LLaDA2.0's."""
    if cfg.temperature != 0:
        return sample_block(logits, cfg, gen)
    tokens = logits.argmax(dim=-1, keepdim=True)
    return tokens[:, 0], torch.gather(torch.softmax(logits, dim=-1), -1, tokens)[:, 0], None


def float_logits(chunks: RowChunks, rows: Tensor, length: int) -> Tensor:
    """(n, V) float32 logits of the hidden rows `rows`: the official forward returns its logits
    in float32, and the sampling (temperature, softmax) runs on them."""
    return gathered(chunks, rows, length).float()


class LLaDA2Sampler(NoLikelihood):
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
        if cfg.editing_threshold is not None:
            cfg = cfg.unset(**EDITING_DEFAULTS)
        elif cfg.max_post_steps is not None or cfg.num_to_transfer is not None:
            raise GenerationConfigError(
                "max_post_steps and num_to_transfer are LLaDA2.1's editing decoding's: set editing_threshold "
                "(its generate's default is 0.9)"
            )
        cfg.check_common(LLADA2)
        if cfg.top_k > self.spec.vocab_size:
            raise GenerationConfigError(f"top_k ({cfg.top_k}) must be at most the vocabulary ({self.spec.vocab_size})")
        if cfg.editing_threshold is None and cfg.minimal_topk > cfg.gen_length:
            raise GenerationConfigError(
                f"minimal_topk ({cfg.minimal_topk}) must be at most gen_length ({cfg.gen_length}): "
                "the steps a block are gen_length // minimal_topk at most"
            )
        return cfg

    def most_rows(self, cfg: GenerationConfig) -> int:
        return cfg.block_length

    def largest_steps(self, cfg: GenerationConfig, prompt_length: int) -> tuple[StepExtent, None]:
        """The last block's step, the largest: the whole canvas, block-causally."""
        canvas = canvas_length(prompt_length, cfg)
        return StepExtent(canvas, 0, canvas if canvas > cfg.block_length else 0), None

    def row_bytes(self, cfg: GenerationConfig, vocab: int, dtype: torch.dtype, device: torch.device) -> int:
        def reduce(positions: Tensor, logits: Tensor, length: int, gen: torch.Generator) -> None:
            rows = torch.arange(logits.shape[1], device=logits.device)
            draw = sample_editing if cfg.editing_threshold is not None else sample_block
            tokens, chosen_p, _ = draw(float_logits(iter([(rows, logits)]), rows, rows.numel()), cfg, gen)
            most_confident(tokens == tokens, chosen_p, 1, cfg.threshold)

        return measure_row_bytes(reduce, 1, vocab, dtype, device)

    def cache_bytes(self, cfg: GenerationConfig, prompt_length: int, dtype: torch.dtype) -> int:
        return 0  # the official decoding recomputes its prefix: nothing is kept across steps

    def start(self, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator) -> LLaDA2State:
        return LLaDA2State(self.spec, prompt, cfg, gen)


class LLaDA2State(DenoiseState):
    """One request's decoding: `next_step`, then `advance` with its block's logits. With an
    `editing_threshold`, LLaDA2.1's (`advance` reveals and edits, a block ends by its post steps)."""

    def __init__(self, spec: ArchSpec, prompt: Tensor, cfg: GenerationConfig, gen: torch.Generator):
        super().__init__(prompt, cfg, gen, spec.mask_token_id, spec.eos_token_ids)
        total = canvas_length(self.prompt_length, cfg)
        self.x = torch.cat([self.x, self.x.new_full((1, total - self.x.shape[1]), self.mask_id)], dim=1)
        self.editing = cfg.editing_threshold is not None
        self.quota = transfer_counts(cfg.block_length, steps_per_block(cfg))
        self.block = self.first_block = self.prompt_length // cfg.block_length
        self.block_step = 0
        self.post_steps = 0  # LLaDA2.1: the block's steps since none of its positions was masked
        self.eos = torch.tensor(self.eos_ids, device=self.x.device)
        self.rows: Tensor | None = None
        self.length = 0  # the step's tokens: the canvas up to the block's end

    @property
    def total_steps(self) -> int:
        """At most: every block its steps (LLaDA2.1: a position a step, then its post steps)."""
        per_block = self.cfg.block_length + self.cfg.max_post_steps if self.editing else len(self.quota)
        return (self.x.shape[1] // self.cfg.block_length - self.first_block) * per_block

    def next_step(self) -> StepInput:
        """The canvas up to the block's end, block-causally, nothing kept; logits of the block's rows."""
        block = self.cfg.block_length
        end = self.length = (self.block + 1) * block
        self.rows = torch.arange(end - block, end, device=self.x.device)
        return StepInput(self.x[:, :end], self.rows, CacheUse(None, refresh=True, keep=end, block=block))

    def block_logits(self, logits: Callable[[], RowChunks]) -> Tensor:
        return float_logits(logits(), self.rows, self.length)

    def sample(self, logits: Callable[[], RowChunks]) -> tuple[Tensor, Tensor]:
        tokens, chosen_p, _ = (sample_editing if self.editing else sample_block)(
            self.block_logits(logits), self.cfg, self.gen
        )
        return tokens, chosen_p

    def propose(self, logits: Callable[[], RowChunks]) -> tuple[Tensor, Tensor]:
        tokens, chosen_p = self.sample(logits)
        return tokens[None], chosen_p[None]

    def advance(self, logits: Callable[[], RowChunks]) -> StepEvent:
        block_length = self.cfg.block_length
        start, end = self.block * block_length, (self.block + 1) * block_length
        tokens, chosen_p = self.sample(logits)
        block = self.x[0, start:end]  # a view: revealing writes the canvas
        masked = block == self.mask_id
        if self.editing:
            transfer, block_done = self.reveal_and_edit(block, masked, tokens, chosen_p, start)
        else:
            transfer = most_confident(masked, chosen_p, self.quota[self.block_step], self.cfg.threshold)
            block[transfer] = tokens[transfer]  # its steps run out with masks left only if one drew the mask
            block_done = not (block == self.mask_id).any() or self.block_step + 1 == len(self.quota)
        self.block_step += 1
        self.steps_run += 1
        done_block = self.block
        if block_done:
            self.block, self.block_step, self.post_steps = self.block + 1, 0, 0
        self.done = self.ended(tokens[transfer], end, block_done) or self.block * block_length == self.x.shape[1]
        settled = None if not self.editing or self.done else max(0, self.block * block_length - self.prompt_length)
        return StepEvent(
            self.steps_run,
            self.total_steps,
            done_block - self.first_block,
            self.answer_canvas,
            self.prompt_length,
            self.mask_id,
            int(transfer.sum()),
            settled,
        )

    def reveal_and_edit(
        self, block: Tensor, masked: Tensor, tokens: Tensor, chosen_p: Tensor, start: int
    ) -> tuple[Tensor, bool]:
        """LLaDA2.1's step: masked positions above `threshold` (at least `num_to_transfer`, the most
        confident), and revealed answer positions whose new token differs with a confidence above
        `editing_threshold`; then whether the block is done (a step with nothing masked and nothing
        edited, or more post steps than `max_post_steps`)."""
        cfg = self.cfg
        transfer = torch.zeros_like(masked)
        if masked.any():
            transfer = most_confident(masked, chosen_p, cfg.num_to_transfer, cfg.threshold)
        prompt = torch.arange(start, start + block.numel(), device=block.device) < self.prompt_length
        editable = ~masked & ~prompt
        edited = editable & (torch.where(editable, chosen_p, -torch.inf) > cfg.editing_threshold) & (tokens != block)
        transfer |= edited
        block[transfer] = tokens[transfer]
        if not masked.any() and not edited.any():
            return transfer, True
        if not (block == self.mask_id).any():  # the next step's start: one more post step
            self.post_steps += 1
        return transfer, self.post_steps > cfg.max_post_steps

    def ended(self, revealed: Tensor, end: int, block_done: bool) -> bool:
        """The official EOS rules (their tests read the window past gen_length too). LLaDA2.0: after a
        block whose answer holds an EOS; with `stop_at_eos` (eos_early_stop), once a step revealed
        an EOS and the answer before the first is revealed. LLaDA2.1: only with `stop_at_eos`, after
        a block, once nothing is masked and an EOS is there."""
        answer = self.x[0, self.prompt_length : end]
        eos = first_eos(answer, self.eos_ids)
        if eos is None:
            return False
        if self.editing:
            ended = self.cfg.stop_at_eos and block_done and not (answer == self.mask_id).any()
        else:
            early = self.cfg.stop_at_eos and bool(torch.isin(revealed, self.eos).any())
            ended = block_done or (early and not bool((answer[:eos] == self.mask_id).any()))
        self.stopped_at_eos = ended and eos < self.cfg.gen_length  # an EOS in the answer returned
        return ended

    @property
    def answer_canvas(self) -> Tensor:
        """The prompt and the first `gen_length` answer positions (what the official code returns
        of its padded canvas)."""
        return self.x[0, : self.prompt_length + self.cfg.gen_length]

    def result(self) -> DenoiseResult:
        return DenoiseResult(self.answer_canvas, self.steps_run, self.steps_run, self.stopped_at_eos)
