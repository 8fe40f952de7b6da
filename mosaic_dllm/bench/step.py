"""One denoising step, the first of a request (every generation position masked): run or predicted.

`first_step` starts the family's sampler on a first-step canvas and runs its step with the executor,
as generation does (decoding/), so what is measured is what generation does. `measure` runs it on
real tensors under the live-tensor tracker and the peak-RSS probe; `predict` runs it under
FakeTensorMode, where no memory is allocated and nothing is computed, to give the same live-tensor
timeline for lengths too long to run. A planned executor's arena is outside aten's view in both: it
is added to the timeline as `planned_bytes` (the plan's arena size). The first step's rows are known
without looking at values (every generated position), so the step runs on fake tensors too; the
reveal bookkeeping that follows (O(L) integers, data-dependent) is not included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import GenerationConfig
from ..decoding import sampler_for
from ..memory.accounting import LiveTensorTracker, Timeline
from ..memory.rss import PeakMemory
from ..models.spec import ArchSpec
from ..models.weights import Weights, expected_shapes, from_state_dict, random_state_dict
from ..runtime import Executor, ExecutorOptions, make_executor


@dataclass
class StepRequest:
    length: int  # total sequence length L
    prompt_length: int
    config: GenerationConfig  # resolved

    @classmethod
    def first_step(cls, spec: ArchSpec, length: int, alpha: float, config: GenerationConfig) -> StepRequest:
        """The first step at total length `length`, prompt fraction `alpha`, one block over the answer."""
        return cls(length, *first_step_config(spec, length, alpha, config))


def first_step_config(
    spec: ArchSpec, length: int, alpha: float, config: GenerationConfig
) -> tuple[int, GenerationConfig]:
    """(prompt length, resolved settings) of a first step at total length `length` and prompt
    fraction `alpha`: one step, one block over the whole answer; settings left unset take the
    sampler's benchmark settings (temperature 0; for Dream an alg whose rows are fixed)."""
    if not 0 <= alpha < 1:
        raise ValueError(f"alpha (prompt fraction) must be in [0, 1), got {alpha}")
    prompt = max(1, int(length * alpha))
    gen_length = length - prompt
    if gen_length < 1:
        raise ValueError(f"length {length} leaves no generation positions at alpha {alpha}")
    sampler = sampler_for(spec)
    config = replace(config, gen_length=gen_length, steps=1, block_length=None).unset(**sampler.bench_settings)
    return prompt, sampler.resolve(config, prompt)


def first_step(executor: Executor, spec: ArchSpec, request: StepRequest, gen: torch.Generator) -> None:
    device = executor.weights.embed.device
    p = request.prompt_length
    prompt = (torch.arange(p, device=device) * 7919) % spec.mask_token_id  # any non-mask ids
    sampler = sampler_for(spec)
    state = sampler.start(prompt, request.config, gen)
    step = sampler.first_step(state)
    sampler_bytes = sampler.row_bytes(request.config, spec.vocab_size, executor.dtype, torch.device("cpu"))
    state.propose(lambda: executor.row_logits(step.ids, step.rows, sampler_bytes))


def executor_options(options: ExecutorOptions | dict | None) -> ExecutorOptions | None:
    """Options as the executor takes them; a dict (JSON jobs: lists for tuples) is converted."""
    if not isinstance(options, dict):
        return options
    return (
        ExecutorOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}) if options else None
    )


@dataclass
class StepMeasurement:
    timeline: Timeline
    rss_growth_bytes: int | None
    seconds: float | None
    plan: dict | None = None  # the step's memory plan (planned executors)


def random_weights(spec: ArchSpec, dtype: torch.dtype, device: str | torch.device = "cpu") -> Weights:
    return from_state_dict(spec, random_state_dict(spec, dtype, device=device))


def measure(
    spec: ArchSpec,
    weights: Weights,
    executor_name: str,
    request: StepRequest,
    options: ExecutorOptions | dict | None = None,
) -> StepMeasurement:
    executor = make_executor(executor_name, spec, weights, executor_options(options))
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
    tracker.timeline.planned_bytes = executor.arena_bytes
    plan = executor.last_plan
    return StepMeasurement(tracker.timeline, peak.growth_bytes, seconds, plan.summary() if plan else None)


def predict(
    spec: ArchSpec,
    dtype: torch.dtype,
    executor_name: str,
    request: StepRequest,
    options: ExecutorOptions | dict | None = None,
) -> Timeline:
    """The live-tensor timeline of the step, from shapes alone (no memory, no compute)."""
    if spec.moe is not None:
        raise NotImplementedError("MoE steps route tokens by value: their memory can be measured, not predicted")
    with FakeTensorMode():
        state = {name: torch.empty(shape, dtype=dtype) for name, shape in expected_shapes(spec).items()}
        executor = make_executor(executor_name, spec, from_state_dict(spec, state), executor_options(options))
        first_step(executor, spec, request, torch.Generator().manual_seed(0))  # plans and sizes the arena
        with LiveTensorTracker() as tracker:
            first_step(executor, spec, request, torch.Generator().manual_seed(0))
    tracker.timeline.planned_bytes = executor.arena_bytes
    return tracker.timeline
