"""The Python API: `LLM(path).generate(prompts, GenerationConfig(...))`.

One request's path: prompt -> token ids -> canvas -> denoising loop of the family (decoding/) that
calls the executor (runtime/) once per step -> tokens -> text.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from . import checkpoint
from .config import BLOCK_FAMILIES, GenerationConfig
from .decoding import dream as dream_decoding
from .decoding import llada as llada_decoding
from .decoding.common import StepCallback, first_eos
from .decoding.sampler_cost import sampler_row_bytes
from .memory.budget import DEFAULT_RESERVE, default_budget, parse_bytes
from .runtime import make_executor
from .tokenizer import TokenizerError

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default_model"
Prompt = str | list[int]


class PromptError(ValueError):
    """A prompt that cannot be generated from (empty, bad ids, text without a tokenizer)."""


@dataclass
class GenerationOutput:
    text: str  # generated text up to the first EOS (the answer)
    token_ids: list[int]  # generated tokens (up to and including the EOS when stopped early)
    prompt_token_ids: list[int]
    forward_passes: int  # forward calls of the network (a CFG step is one call on a batch of two)
    steps: int  # denoising steps run
    seconds: float
    finish_reason: str  # "eos" (an EOS ends the answer) or "length"


def default_model_path() -> Path:
    return DEFAULT_MODEL


class LLM:
    def __init__(
        self,
        model: str | Path | None = None,
        *,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        executor: str = "mosaic",
        memory_budget: int | str | None = None,
        memory_reserve: int | str = DEFAULT_RESERVE,
        **executor_options,
    ):
        """`memory_budget` (bytes or '8GiB'): activation memory a step may use; by default what the
        device has free once the weights are loaded, minus `memory_reserve`. Mosaic executor only."""
        if memory_budget is not None and executor != "mosaic":
            raise ValueError(f"a memory budget needs the mosaic executor (the {executor} executor cannot chunk)")
        budget = parse_bytes(memory_budget) if memory_budget is not None else None
        reserve = parse_bytes(memory_reserve)
        self.checkpoint = checkpoint.load(model or default_model_path(), dtype=dtype, device=device)
        self.spec = self.checkpoint.spec
        self.tokenizer = self.checkpoint.tokenizer
        if executor == "mosaic":
            executor_options["memory_budget"] = budget or default_budget(self.checkpoint.weights.embed.device, reserve)
        self.executor = make_executor(executor, self.spec, self.checkpoint.weights, **executor_options)
        self._sampler_costs: dict[tuple, int] = {}

    def default_config(self, **overrides) -> GenerationConfig:
        """GenerationConfig from the checkpoint's generation_config.json, then `overrides` (None = keep)."""
        stored = dict(self.checkpoint.generation_config)
        if "max_new_tokens" in stored:
            stored.setdefault("gen_length", stored["max_new_tokens"])
        known = {f.name for f in fields(GenerationConfig)}
        values = {k: v for k, v in stored.items() if k in known}
        values |= {k: v for k, v in overrides.items() if v is not None}
        return GenerationConfig.from_dict(values)

    @property
    def device(self) -> torch.device:
        return self.checkpoint.device

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty")
            if self.tokenizer is None:
                raise PromptError(f"{self.checkpoint.path} has no tokenizer files; pass token ids instead of text")
            if chat:
                return self.encode_chat([{"role": "user", "content": prompt}])
            ids = self.tokenizer.encode(prompt)
        else:
            if chat:
                raise PromptError("chat templates apply to text prompts, not to token ids")
            ids = list(prompt)
        if not ids:
            raise PromptError("the prompt is empty")
        bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.spec.vocab_size]
        if bad:
            raise PromptError(f"prompt token ids outside the vocabulary [0, {self.spec.vocab_size}): {bad[:10]}")
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a conversation through the tokenizer's chat template, ready for the answer."""
        if self.tokenizer is None:
            raise PromptError(f"{self.checkpoint.path} has no tokenizer files: chat needs its template")
        if not messages or not any(m.get("content", "").strip() for m in messages):
            raise PromptError("the conversation is empty")
        return self.encode(self.tokenizer.encode(self.tokenizer.apply_chat_template(messages)))

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        config: GenerationConfig | None = None,
        *,
        chat: bool = False,
        callback: StepCallback | None = None,
    ) -> list[GenerationOutput]:
        """Generate for one prompt or a list; each prompt runs as its own request (batch size one)."""
        cfg = (config or self.default_config()).resolved(self.spec.family)
        batch = [prompts] if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)) else prompts
        if not batch:
            raise PromptError("the prompt is empty (no prompt or token ids given)")
        encoded = [self.encode(p, chat) for p in batch]  # every prompt checked before any work
        for ids in encoded:
            self.check_memory(len(ids), cfg)
        return [self._generate_one(ids, cfg, callback) for ids in encoded]

    def check_memory(self, prompt_length: int, cfg: GenerationConfig):
        """Plan the request's largest step before any work; raises `DoesNotFit` (with the longest
        length that would fit) when the memory budget cannot hold it. Returns that step's plan
        (None for executors without a plan)."""
        if not self.executor.mask_only:
            return None
        block = self.spec.family in BLOCK_FAMILIES
        batch = 2 if block and cfg.cfg_scale > 0 else 1
        rows = cfg.block_length if block else cfg.gen_length  # the first step reads the most rows
        return self.executor.plan_for(batch, prompt_length + cfg.gen_length, rows, self._sampler_row_bytes(cfg))

    def _sampler_row_bytes(self, cfg: GenerationConfig) -> int:
        key = (cfg.temperature, cfg.cfg_scale, cfg.remasking, cfg.alg, cfg.top_p, cfg.top_k)
        if key not in self._sampler_costs:
            device = self.checkpoint.weights.embed.device
            self._sampler_costs[key] = sampler_row_bytes(
                self.spec.family, cfg, self.spec.vocab_size, self.executor.dtype, device
            )
        return self._sampler_costs[key]

    def _generate_one(
        self, prompt_ids: list[int], cfg: GenerationConfig, callback: StepCallback | None
    ) -> GenerationOutput:
        total = len(prompt_ids) + cfg.gen_length
        if total > self.spec.max_position_embeddings:
            warnings.warn(
                f"sequence length {total} exceeds the checkpoint's trained context "
                f"({self.spec.max_position_embeddings}); quality may degrade",
                stacklevel=3,
            )
        gen = torch.Generator(device=self.device)
        gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.seed() % (1 << 62)))
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)
        denoise = llada_decoding.denoise if self.spec.family in BLOCK_FAMILIES else dream_decoding.denoise
        if self.executor.mask_only:
            self.executor.sampler_row_bytes = self._sampler_row_bytes(cfg)
        start = time.perf_counter()
        try:
            result = denoise(
                self.executor, prompt, cfg, self.spec.mask_token_id, self.spec.eos_token_ids, gen, callback
            )
        finally:
            self.executor.release()  # the request's activation memory goes back, also on cancel or error
        seconds = time.perf_counter() - start
        generated = result.canvas[len(prompt_ids) :].tolist()
        eos = first_eos(result.canvas[len(prompt_ids) :], self.spec.eos_token_ids)
        answer = generated if eos is None else generated[:eos]
        return GenerationOutput(
            text=self.decode(answer),
            token_ids=generated[: eos + 1] if result.stopped_at_eos else generated,
            prompt_token_ids=prompt_ids,
            forward_passes=result.forward_passes,
            steps=result.steps_run,
            seconds=seconds,
            finish_reason="eos" if eos is not None else "length",
        )


__all__ = ["LLM", "GenerationConfig", "GenerationOutput", "PromptError", "TokenizerError"]
