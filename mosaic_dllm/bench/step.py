"""One denoising step, the first of a request (every generation position masked): run or predicted.

`first_step` calls the same decoding functions as generation (decoding/), with the canvas of a
first step, so what is measured is what generation does. `measure` runs it on real tensors under
the live-tensor tracker and the peak-RSS probe; `predict` runs it under FakeTensorMode, where no
memory is allocated and nothing is computed, to give the same live-tensor timeline for lengths too
long to run. A planned executor's arena is outside aten's view in both: it is added to the
timeline as `planned_bytes` (the plan's arena size). The reveal bookkeeping that follows a step
(O(L) integers) is not included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import BLOCK_FAMILIES, GenerationConfig
from ..decoding import dream, llada
from ..decoding.sampler_cost import sampler_row_bytes
from ..memory.accounting import LiveTensorTracker, Timeline
from ..memory.rss import PeakMemory
from ..models.spec import ArchSpec
from ..models.weights import Weights, expected_shapes, from_state_dict, random_state_dict
from ..runtime import make_executor


@dataclass
class StepRequest:
    length: int  # total sequence length L
    prompt_length: int
    config: GenerationConfig  # resolved

    @classmethod
    def first_step(cls, spec: ArchSpec, length: int, alpha: float, config: GenerationConfig) -> StepRequest:
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha (prompt fraction) must be in [0, 1), got {alpha}")
        prompt = max(1, int(length * alpha))
        gen_length = length - prompt
        if gen_length < 1:
            raise ValueError(f"length {length} leaves no generation positions at alpha {alpha}")
        if config.alg == "origin" and spec.family not in BLOCK_FAMILIES:
            raise ValueError("benchmark Dream with alg maskgit_plus, topk_margin or entropy: origin's rows are random")
        cfg = GenerationConfig(**{**vars(config), "gen_length": gen_length, "steps": 1, "block_length": None})
        return cls(length, prompt, cfg.resolved(spec.family))


def first_step(executor, spec: ArchSpec, request: StepRequest, gen: torch.Generator) -> None:
    device = executor.weights.embed.device
    cfg, p = request.config, request.prompt_length
    x = torch.full((1, request.length), spec.mask_token_id, dtype=torch.long, device=device)
    x[0, :p] = (torch.arange(p, device=device) * 7919) % spec.mask_token_id  # any non-mask ids
    if spec.family in BLOCK_FAMILIES:
        readable = torch.arange(p, p + cfg.block_length, device=device)
        chunks = llada.step_chunks(executor, x, readable, x != spec.mask_token_id, spec.mask_token_id, cfg.cfg_scale)
        llada.propose(chunks, x, spec.vocab_size, cfg.temperature, cfg.remasking, gen)
    else:
        masked = torch.arange(p, request.length, device=device)
        dream.sample_rows(
            dream.masked_row_chunks(executor, x, masked, None),
            gen,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            top_k=cfg.top_k,
            margin_confidence=cfg.alg == "topk_margin",
            neg_entropy=cfg.alg == "entropy",
        )


@dataclass
class StepMeasurement:
    timeline: Timeline
    rss_growth_bytes: int | None
    seconds: float | None
    plan: dict | None = None  # the step's memory plan (planned executors)


def random_weights(spec: ArchSpec, dtype: torch.dtype, device: str | torch.device = "cpu") -> Weights:
    return from_state_dict(spec, random_state_dict(spec, dtype, device=device))


def make_step_executor(executor_name: str, spec: ArchSpec, weights: Weights, request: StepRequest, options: dict):
    """The executor, told what the request's sampler costs per logits row (its plans include it)."""
    executor = make_executor(executor_name, spec, weights, **options)
    if executor.mask_only:
        executor.sampler_row_bytes = sampler_row_bytes(spec.family, request.config, spec.vocab_size, executor.dtype)
    return executor


def measure(
    spec: ArchSpec, weights: Weights, executor_name: str, request: StepRequest, options: dict | None = None
) -> StepMeasurement:
    executor = make_step_executor(executor_name, spec, weights, request, options or {})
    device = weights.embed.device
    warm = StepRequest.first_step(spec, 64, 0.5, request.config)  # one-time kernel set-up, off the record
    first_step(executor, spec, warm, torch.Generator(device=device).manual_seed(0))
    executor.release()  # the measured step commits its own arena pages
    gen = torch.Generator(device=device).manual_seed(0)
    with PeakMemory(device) as peak, LiveTensorTracker() as tracker:
        start = time.perf_counter()
        first_step(executor, spec, request, gen)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    tracker.timeline.planned_bytes = getattr(executor, "arena_bytes", 0)
    plan = getattr(executor, "last_plan", None)
    return StepMeasurement(tracker.timeline, peak.growth_bytes, seconds, plan.summary() if plan else None)


def predict(
    spec: ArchSpec, dtype: torch.dtype, executor_name: str, request: StepRequest, options: dict | None = None
) -> Timeline:
    """The live-tensor timeline of the step, from shapes alone (no memory, no compute)."""
    if spec.moe is not None:
        raise NotImplementedError("MoE steps route tokens by value: their memory can be measured, not predicted")
    sampler = sampler_row_bytes(spec.family, request.config, spec.vocab_size, dtype)  # real tensors, 4 rows
    with FakeTensorMode():
        state = {name: torch.empty(shape, dtype=dtype) for name, shape in expected_shapes(spec).items()}
        executor = make_executor(executor_name, spec, from_state_dict(spec, state), **(options or {}))
        if executor.mask_only:
            executor.sampler_row_bytes = sampler
        first_step(executor, spec, request, torch.Generator().manual_seed(0))  # plans and sizes the arena
        with LiveTensorTracker() as tracker:
            first_step(executor, spec, request, torch.Generator().manual_seed(0))
    tracker.timeline.planned_bytes = getattr(executor, "arena_bytes", 0)
    return tracker.timeline
