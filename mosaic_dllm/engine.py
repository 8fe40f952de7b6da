"""The Python API: `LLM(path).generate(prompts, GenerationConfig(...))`.

One request's path: prompt -> token ids -> settings resolved and checked, its largest step planned
-> the scheduler (scheduler.py) starts the family sampler's state (decoding/) when the request joins
the running batch -> each step, the executor (runtime/) gives the logits of the rows every state
reads in one packed forward pass, and each state advances -> tokens -> text.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from . import checkpoint
from .checkpoint import CheckpointError
from .config import GenerationConfig, GenerationConfigError
from .decoding import sampler_for
from .decoding.common import DenoiseResult, GenerationCancelled, StepCallback, first_eos
from .memory.budget import DEFAULT_RESERVE, default_budget
from .memory.sizes import parse_bytes
from .models import ConfigError
from .models.groups import Chunks, searchable_groups
from .models.quantized import parse_quantization
from .plan.search import DoesNotFit
from .plan.shapes import RequestShape
from .plan.step_plan import LRU, StepPlan
from .runtime import PARALLEL, PLANNED, ExecutorOptions, LeadExecutor, check_executor, make_executor
from .scheduler import Request, Scheduler, StepRecord
from .tokenizer import TokenizerError

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path(__file__).parent / "assets" / "default_model"
DEFAULT_MAX_BATCH = 16
Prompt = str | list[int]


def prompt_batch(prompts) -> list:
    """The prompts of a `generate` call as a list of prompts, each a text or a list of token ids;
    TypeError for anything else (bytes, floats, chat messages, ...). Out-of-range ids are the
    encoder's to refuse (PromptError)."""
    if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple):
        kind = type(prompts).__name__
        raise TypeError(f"prompts must be a text, a list of token ids, or a list of those; got {kind}")
    if not prompts:
        raise PromptError("the prompt is empty (no prompt or token ids given)")
    for prompt in prompts:
        if isinstance(prompt, dict):
            raise TypeError("chat messages are not prompts: pass the user's text with chat=True")
        if isinstance(prompt, float):
            raise TypeError(f"token ids must be ints; got {prompt!r} (a float)")
        if isinstance(prompt, str):
            continue
        ids = prompt if isinstance(prompt, list | tuple) else [None]
        odd = next((i for i in ids if not isinstance(i, int)), False)
        if odd is not False:
            got = type(prompt).__name__ + (f" holding a {type(odd).__name__}" if ids is prompt else "")
            raise TypeError(f"each prompt must be a text or a list of int token ids; got a {got}")
    return list(prompts)


class PromptError(ValueError):
    """A prompt that cannot be generated from (empty, bad ids, text without a tokenizer)."""


class ContextTooLong(PromptError):
    """Prompt plus answer exceed the checkpoint's context, and long contexts are not allowed."""


# What a caller did wrong (as opposed to an engine fault): the CLI prints these as one line, the
# server answers them with 400.
USER_ERRORS = (
    CheckpointError,
    ConfigError,
    GenerationConfigError,
    PromptError,
    TokenizerError,
    GenerationCancelled,
    ValueError,
)


@dataclass(frozen=True)
class EngineInfo:
    """What a front end (the server, the page) shows of an engine, without reaching into it."""

    family: str  # the checkpoint's family (llada, llada_moe, dream)
    sampler: str  # which settings it reads (config.LLADA or config.DREAM)
    executor: str
    memory_budget: int | None  # bytes a step may use (None: unplanned)
    max_batch: int
    context: int  # the checkpoint's positions
    eos_token_ids: tuple[int, ...]
    chat: bool  # the tokenizer has a chat template (a model never trained on chats has none)
    weights: str  # as computed: the dtype, or the quantization (an approximation of the model)


@dataclass
class GenerationOutput:
    text: str  # generated text up to the first EOS (the answer)
    token_ids: list[int]  # generated tokens (up to and including the EOS when stopped early)
    prompt_token_ids: list[int]
    forward_passes: int  # forward calls of the network (a CFG step is one call on a batch of two)
    steps: int  # denoising steps run
    seconds: float
    finish_reason: str  # "stop" (an EOS ends the answer) or "length", as OpenAI names them
    completion_tokens: int  # tokens of the answer, its EOS included (not the padding after it)
    settings: dict  # every generation setting as resolved for this request (GenerationConfig fields),
    # and "weights" (e.g. "int4-g32") when the weights are quantized


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
        row_chunk: int | None = None,
        chunks: Chunks | None = None,
        chunk_groups: tuple[str, ...] | None = None,
        activations: str | None = None,
        allow_long_context: bool = False,
        allow_recompute: bool = False,
        max_batch: int = DEFAULT_MAX_BATCH,
        allow_special_tokens: bool = False,
        on_step: Callable[[StepRecord], None] | None = None,
        quantize: str | None = None,
        quantize_head: bool = False,
        quantize_embeddings: bool = False,
    ):
        """`memory_budget` (bytes or '8GiB'): activation memory a step may use; by default what the
        device has free once the weights are loaded, minus `memory_reserve`. It and the other
        options (`row_chunk`, forced `chunks`, `chunk_groups` the search may split, `activations`)
        apply to the Mosaic executor; see `runtime.ExecutorOptions`. A request longer than the
        checkpoint's context is refused unless `allow_long_context` (quality may degrade).
        `allow_recompute`: when no exact plan fits the budget, the search may recompute keys and
        values per query block instead (more compute, logits within a tolerance of the exact ones).
        `max_batch`: most requests sharing a forward pass (1: one at a time); batched or not, each
        request's tokens are the same. Prompt text holding a special token's text (the mask token,
        EOS, chat markers) is refused unless `allow_special_tokens` (then it is that token: a mask
        token in the prompt is a position to fill); token-id prompts are taken as given. `on_step`
        sees every batched step as it ran (`scheduler.StepRecord`: time, requests, plan).
        `quantize` ('int8', 'int4', 'int4-g64', 'int4-g128'): linear weights quantized as they load,
        an approximation of the model (`models/quantized.py`); `quantize_head`: the LM head too;
        `quantize_embeddings`: the embedding table as int8 rows."""
        self.allow_long_context = allow_long_context
        self.allow_special_tokens = allow_special_tokens
        chunk_groups = searchable_groups(allow_recompute, chunk_groups)
        given = {"row_chunk": row_chunk, "chunks": chunks, "chunk_groups": chunk_groups, "activations": activations}
        if memory_budget is not None:
            given["memory_budget"] = parse_bytes(memory_budget)
        options = ExecutorOptions(**{k: v for k, v in given.items() if v is not None})
        reserve = parse_bytes(memory_reserve, "memory_reserve", 0)
        check_executor(executor, options)  # before the weights are loaded
        Scheduler.check_max_batch(max_batch)
        scheme = parse_quantization(quantize, quantize_head, quantize_embeddings)
        rank_rows = None  # a tensor-parallel rank reads only its rows of the checkpoint
        if executor.startswith("tensor-parallel") and dist.is_available() and dist.is_initialized():
            rank_rows = (dist.get_rank(), dist.get_world_size())
        self.checkpoint = checkpoint.load(model or default_model_path(), dtype, device, scheme, rank_rows)
        self.spec = self.checkpoint.spec
        self.tokenizer = self.checkpoint.tokenizer
        vocabulary = {t: self.tokenizer.token_to_id(t) for t in self.tokenizer.special_tokens} if self.tokenizer else {}
        self.sampler = sampler_for(
            self.spec, self.checkpoint.model_config, self.checkpoint.generation_config, vocabulary
        )
        if executor in PLANNED and options.memory_budget is None:
            device = self.checkpoint.weights.embed.device
            local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) if device.type == "cpu" else 1
            budget = default_budget(device, reserve, local_ranks if executor in PARALLEL else 1)
            options = replace(options, memory_budget=budget)
        self.executor = make_executor(executor, self.spec, self.checkpoint.weights, options)
        self.scheduler = Scheduler(self.executor, max_batch, on_step)
        self.lead: LeadExecutor | None = None  # serving across ranks as rank 0 (`lead_ranks`)
        self._sampler_costs = LRU(64)  # by settings: bytes per logits row

    @property
    def ranks(self) -> int:
        """Processes serving each step: the group's when serving across ranks, else 1."""
        return self.lead.group_size if self.lead else 1

    @property
    def ranks_lost(self) -> str | None:
        """Serving across ranks: what the collective that found another rank gone said (None: all well)."""
        return self.lead.lost if self.lead else None

    @property
    def rank_memory(self) -> list[dict[str, int]]:
        """Serving across ranks: each rank's RSS and arena bytes after the last step ([] otherwise)."""
        return self.lead.rank_memory if self.lead else []

    def check_ranks(self) -> str | None:
        """Serving across ranks: whether the other ranks still answer (None: they do, or one process)."""
        return self.lead.check_ranks() if self.lead else None

    def lead_ranks(self) -> None:
        """Serve as rank 0 of a parallel group: each step is announced to the other ranks, which
        make the same calls (`runtime.lead.follow`)."""
        self.executor = self.lead = LeadExecutor(self.executor)
        self.scheduler.executor = self.executor

    def default_config(self, **overrides) -> GenerationConfig:
        """Settings from keyword overrides (None = unset: the family's sampler resolves it)."""
        return GenerationConfig.from_dict({k: v for k, v in overrides.items() if v is not None})

    def resolve(self, config: GenerationConfig, prompt_length: int = 0) -> GenerationConfig:
        """`config` with every unset setting filled as the family's official code would fill it (some
        defaults depend on the prompt's length), every setting checked (GenerationConfigError)."""
        return self.sampler.resolve(config, prompt_length)

    @property
    def info(self) -> EngineInfo:
        return EngineInfo(
            self.spec.family,
            self.sampler.family,
            self.executor.name,
            self.executor.memory_budget,
            self.scheduler.max_batch,
            self.spec.max_position_embeddings,
            self.spec.eos_token_ids,
            bool(self.tokenizer and self.tokenizer.chat_template),
            self._weights_label.get("weights", str(self.executor.dtype).removeprefix("torch.")),
        )

    @property
    def committed_bytes(self) -> int:
        """Arena bytes committed now (0 when unplanned)."""
        return self.executor.committed_bytes

    def plan(self, request: Request) -> StepPlan | None:
        """Plan a request's largest step against the memory budget and keep the plan on it (None
        for an unplanned executor); raises `DoesNotFit` with the longest length that would fit.
        With `cache_dtype="auto"` the block cache is int8 only if the model's dtype does not fit."""
        cfg = request.config
        try:
            request.plan = self.executor.plan_for(request.worst)
        except DoesNotFit:
            if cfg.cache_dtype != "auto" or not request.worst.cache_bytes:
                raise
            request.config = replace(cfg, cache_dtype="int8")
            request.worst, request.later = self.step_shapes(len(request.prompt), request.config)
            request.plan = self.executor.plan_for(request.worst)
        if request.config.cache_dtype == "auto":  # the model's dtype fits
            request.config = replace(cfg, cache_dtype="model")
        return request.plan

    @property
    def device(self) -> torch.device:
        return self.checkpoint.device

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt.strip():
                raise PromptError("the prompt is empty")
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise PromptError(f"the prompt is not valid Unicode text (at character {exc.start})") from None
            if self.tokenizer is None:
                raise PromptError(f"{self.checkpoint.path} has no tokenizer files; pass token ids instead of text")
            self.check_special_text(prompt)
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

    def check_special_text(self, text: str) -> None:
        """User text may not carry a special token's text unless the engine allows it: infilling
        is a choice, injection (an EOS or chat marker smuggled into a message) is not."""
        found = None if self.allow_special_tokens else self.tokenizer.special_token_in(text)
        if found is not None:
            raise PromptError(
                f"the prompt's text contains the special token {found!r}; pass allow_special_tokens=True "
                "(CLI and server: --allow-special-tokens) to let text carry special tokens (e.g. mask tokens "
                "to fill), or give token ids"
            )

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
        for message in messages:
            self.check_special_text(message.get("content", ""))
        return self.encode(self.tokenizer.encode(self.tokenizer.apply_chat_template(messages)))

    def generate(
        self,
        prompts: Prompt | list[Prompt],
        config: GenerationConfig | list[GenerationConfig] | None = None,
        *,
        chat: bool = False,
        callback: StepCallback | None = None,
    ) -> list[GenerationOutput]:
        """Generate for one prompt or a list, with one config or one per prompt. The requests run
        batched (up to `max_batch` per forward pass, as the memory plan admits); each one's tokens
        are those it gets alone. Every prompt and setting is checked before any work; `callback`
        sees every request's steps. Raises the first failed request's error once all have ended."""
        requests = self._submit(prompts, config, chat, callback)
        self.scheduler.run(requests)
        return [self.output(request) for request in requests]

    def stream(
        self,
        prompts: Prompt | list[Prompt],
        config: GenerationConfig | list[GenerationConfig] | None = None,
        *,
        chat: bool = False,
        callback: StepCallback | None = None,
    ) -> Iterator[tuple[int, GenerationOutput]]:
        """`generate`, yielding (prompt index, output) as each request finishes; a failed request
        raises when it finishes. Requests still running when the iterator is closed are cancelled."""
        requests = self._submit(prompts, config, chat, callback)
        pending = dict(enumerate(requests))
        try:
            while pending:
                finished = [i for i, r in pending.items() if r.result.done()]
                if not finished:
                    self.scheduler.step()
                for i in finished:
                    yield i, self.output(pending.pop(i))
        finally:
            for request in pending.values():  # they leave the batch at the next step
                request.cancelled.set()

    def _submit(self, prompts, config, chat: bool, callback: StepCallback | None) -> list[Request]:
        """Check every prompt and setting (before any work), then queue the requests."""
        batch = prompt_batch(prompts)
        configs = (
            config if isinstance(config, list) else [GenerationConfig() if config is None else config] * len(batch)
        )
        if len(configs) != len(batch):
            raise ValueError(f"{len(configs)} configs for {len(batch)} prompts: give one, or one per prompt")
        for cfg in configs:
            if not isinstance(cfg, GenerationConfig):
                raise TypeError(
                    f"config must be a GenerationConfig (or a list of them, one per prompt), got "
                    f"{type(cfg).__name__}; GenerationConfig.from_dict(...) makes one from a dict"
                )
        for cfg in configs:
            self.resolve(cfg)  # bad settings fail before the prompts are encoded
        encoded = [self.encode(p, chat) for p in batch]  # every prompt checked before any work
        requests = []
        for ids, cfg in zip(encoded, configs, strict=True):  # a loop, not a comprehension: one frame to the user
            requests.append(self.request(ids, cfg, callback, stacklevel=4))
        for request in requests:
            self.scheduler.submit(request)
        return requests

    def request(
        self,
        prompt_ids: list[int],
        config: GenerationConfig,
        callback: StepCallback | None = None,
        *,
        planned: bool = True,
        stacklevel: int = 2,
    ) -> Request:
        """One request, resolved once, that admission, planning and the scheduler share: its
        settings resolved (GenerationConfigError), its context checked (`check_context`; a warning
        `stacklevel` frames up from here when long contexts are allowed), and, when `planned`, its
        largest step planned (`plan`: DoesNotFit with the longest length that fits)."""
        cfg = self.resolve(config, len(prompt_ids))
        self.check_context(len(prompt_ids), cfg, stacklevel=stacklevel + 1)
        prompt = torch.tensor(prompt_ids, dtype=torch.long, device=self.device)

        def start():  # the settings as planned (`plan` may choose the block cache's precision)
            gen = torch.Generator(device=self.device)
            gen.manual_seed(cfg.seed if cfg.seed is not None else int(torch.seed() % (1 << 62)))
            return self.sampler.start(prompt, request.config, gen)

        worst, later = self.step_shapes(len(prompt_ids), cfg)
        request = Request(prompt, cfg, start, worst, callback=callback, later=later)
        if planned:
            self.plan(request)
        return request

    def output(self, request: Request) -> GenerationOutput:
        """The finished request's output (raises its error if it failed or was cancelled)."""
        result, seconds = request.result.result()
        return self._output(request.prompt.tolist(), request.config, result, seconds)

    def check_context(self, prompt_length: int, cfg: GenerationConfig, stacklevel: int = 3) -> None:
        """Refuse a request beyond the checkpoint's context unless long contexts are allowed (then warn)."""
        total, context = prompt_length + cfg.gen_length, self.spec.max_position_embeddings
        largest = self.sampler.largest_steps(cfg, prompt_length)[0]
        canvas = max(largest.tokens, largest.keys)  # block diffusion: padded to whole blocks
        if max(total, canvas) <= context:
            return
        message = f"the prompt ({prompt_length} tokens) plus gen_length ({cfg.gen_length}) is {total} tokens"
        if canvas > total:
            message += f", {canvas} positions in whole blocks of {cfg.block_length},"
        message += f" more than the checkpoint's context of {context}"
        if not self.allow_long_context:
            raise ContextTooLong(
                f"{message}; pass allow_long_context=True (CLI: --allow-long-context) to run it anyway"
            )
        warnings.warn(f"{message}; quality may degrade", stacklevel=stacklevel)

    def check_memory(self, prompt_length: int, cfg: GenerationConfig) -> StepPlan | None:
        """Plan the request's largest step (the first) before any work; raises `DoesNotFit` (with the
        longest length that would fit) when the memory budget cannot hold it. Returns that step's
        plan (None for an unplanned executor)."""
        return self.executor.plan_for(self.worst_step(prompt_length, self.resolve(cfg, prompt_length)))

    def worst_step(self, prompt_length: int, cfg: GenerationConfig) -> RequestShape:
        """A request's largest step (the sampler's: the whole canvas for the full-canvas families),
        with the most rows any step reads and its block cache alive; resolved settings `cfg`."""
        return self.step_shapes(prompt_length, cfg)[0]

    def step_shapes(self, prompt_length: int, cfg: GenerationConfig) -> tuple[RequestShape, RequestShape | None]:
        """The request's largest step, and the largest after its first (None: the same)."""
        extents = self.sampler.largest_steps(cfg, prompt_length)
        batch, rows = self.sampler.guidance_batch(cfg), self.sampler.most_rows(cfg)
        row_bytes = self.sampler_row_bytes(cfg)
        cache = self.sampler.cache_bytes(cfg, prompt_length, self.executor.dtype)
        shapes = [RequestShape(batch, e.tokens, rows, row_bytes, cache, e.keys, e.masked_keys) for e in extents if e]
        return shapes[0], shapes[1] if len(shapes) > 1 else None

    def sampler_row_bytes(self, cfg: GenerationConfig) -> int:
        """The sampler's measured temporary bytes per logits row with resolved settings `cfg`."""
        key = replace(cfg, gen_length=1, steps=1, block_length=None, seed=0, stop_at_eos=False)
        cost = self._sampler_costs.lookup(key)
        if cost is None:
            device = self.checkpoint.weights.embed.device
            cost = self.sampler.row_bytes(cfg, self.spec.vocab_size, self.executor.dtype, device)
            self._sampler_costs.put(key, cost)
        return cost

    def _output(
        self, prompt_ids: list[int], cfg: GenerationConfig, result: DenoiseResult, seconds: float
    ) -> GenerationOutput:
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
            finish_reason="stop" if eos is not None else "length",
            completion_tokens=len(answer) + (eos is not None),
            settings=cfg.given() | self._weights_label,
        )

    @property
    def _weights_label(self) -> dict:
        """Quantized weights are an approximation of the model: every output says so."""
        scheme = self.spec.quantization
        return {"weights": scheme.label} if scheme else {}


__all__ = [
    "LLM",
    "USER_ERRORS",
    "DoesNotFit",
    "GenerationConfig",
    "GenerationOutput",
    "PromptError",
    "TokenizerError",
]
