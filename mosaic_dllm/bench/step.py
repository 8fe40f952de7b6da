"""One denoising step, the first of a request (every generation position masked): run or predicted.

`first_step` starts the family's sampler on a first-step canvas and runs its step with the executor,
as generation does (decoding/), so what is measured is what generation does. `measure` runs it on
real tensors under the live-tensor tracker and the peak-RSS probe; `predict` runs it under
FakeTensorMode, where no memory is allocated and nothing is computed, to give the same live-tensor
timeline for lengths too long to run. A planned executor's arena is outside aten's view in both:
it is added to the timeline as `planned_bytes` (the plan's arena size). The first step's rows are
known without looking at values (every generated position); the canvas and those rows stay real
tensors in a prediction, so the LLaDA sampler's noise replay at temperature > 0 reads its rows from
them. Dream's sampler at temperature > 0 checks Categorical's constraint by value: a prediction
samples and then also runs the refusal's argmax pass, so it covers whichever path real rows take.
The reveal bookkeeping that follows (O(L) integers, data-dependent) is not included.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from ..config import DREAM, LLADA, LLADA2, SDAR, GenerationConfig
from ..decoding import sampler_for
from ..decoding.common import StepInput
from ..memory.accounting import LiveTensorTracker, Timeline
from ..memory.prediction import predicting
from ..memory.rss import PeakMemory
from ..models.quantized import quantized_weights
from ..models.spec import ArchSpec
from ..models.weights import Weights, file_shapes, from_state_dict, random_state_dict
from ..runtime import Executor, ExecutorOptions, make_executor

# A benchmark step's settings where the caller leaves them unset: temperature 0, and rows fixed by
# the canvas (Dream's origin reveals a random subset of rows, so its benchmark ranks by maskgit_plus).
BENCH_SETTINGS = {
    LLADA: {"temperature": 0.0},
    DREAM: {"alg": "maskgit_plus", "temperature": 0.0},
    SDAR: {"temperature": 0.0},
    LLADA2: {"temperature": 0.0},
}


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
    config = replace(config, gen_length=gen_length, steps=1, block_length=None).unset(**BENCH_SETTINGS[sampler.family])
    return prompt, sampler.resolve(config, prompt)


def first_step(
    executor: Executor, spec: ArchSpec, request: StepRequest, gen: torch.Generator, sampler_bytes: int | None = None
) -> None:
    """Start the sampler on a first-step canvas and run that step (`sampler_bytes`: the sampler's
    measured bytes per logits row, measured here unless given)."""
    run_first_step(executor, start_first_step(spec, request, executor.weights.embed.device, gen), sampler_bytes)


def start_first_step(spec: ArchSpec, request: StepRequest, device: torch.device, gen: torch.Generator):
    """(sampler, state, step input) of a request's first step: small real tensors (the canvas, the
    rows), so a prediction under FakeTensorMode can still read which rows the step samples."""
    p = request.prompt_length
    prompt = (torch.arange(p, device=device) * 7919) % spec.mask_token_id  # any non-mask ids
    sampler = sampler_for(spec)
    state = sampler.start(prompt, request.config, gen)
    return sampler, state, sampler.first_step(state)


def run_first_step(executor: Executor, started, sampler_bytes: int | None = None) -> None:
    sampler, state, step = started
    if sampler_bytes is None:
        sampler_bytes = sampler.row_bytes(state.cfg, executor.spec.vocab_size, executor.dtype, torch.device("cpu"))
    state.propose(lambda: executor.row_logits(step.ids, step.rows, sampler_bytes, step.cache))


def _fake_canvas(mode: FakeTensorMode, started):
    """The started step with its tensors fake, as the executor's, except the state's `rows`: LLaDA's
    noise replay reads the rows it asked for by value (a conversion inside the mode would count as
    an allocation the real step does not make, so the conversion happens here, before tracking)."""
    sampler, state, step = started
    for name, value in vars(state).items():
        if isinstance(value, torch.Tensor) and name != "rows":
            setattr(state, name, mode.from_tensor(value))
    return sampler, state, StepInput(mode.from_tensor(step.ids), mode.from_tensor(step.rows), step.cache)


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
    """Random weights, quantized as `spec.quantization` says."""
    return quantized_weights(spec, random_state_dict(spec, dtype, device=device))


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
    started = start_first_step(spec, request, device, torch.Generator(device=device).manual_seed(0))
    sampler_bytes = started[0].row_bytes(request.config, spec.vocab_size, executor.dtype, torch.device("cpu"))
    with PeakMemory(device) as peak, LiveTensorTracker() as tracker:  # the step, not its inputs
        start = time.perf_counter()
        run_first_step(executor, started, sampler_bytes)
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
    if spec.quantization is not None:
        raise NotImplementedError("quantized weights are packed by value: their steps are measured, not predicted")
    sampler_bytes = sampler_for(spec).row_bytes(request.config, spec.vocab_size, dtype, torch.device("cpu"))
    started = [start_first_step(spec, request, torch.device("cpu"), torch.Generator().manual_seed(0)) for _ in range(2)]
    with predicting(), FakeTensorMode(allow_non_fake_inputs=True) as mode:  # the rows stay real: the sampler reads them
        state = {name: torch.empty(shape, dtype=dtype) for name, shape in file_shapes(spec).items()}
        executor = make_executor(executor_name, spec, from_state_dict(spec, state), executor_options(options))
        started = [_fake_canvas(mode, s) for s in started]  # as measured: the canvas is an input, not a step buffer
        run_first_step(executor, started[0], sampler_bytes)  # plans and sizes the arena
        with LiveTensorTracker() as tracker:
            run_first_step(executor, started[1], sampler_bytes)
    tracker.timeline.planned_bytes = executor.arena_bytes
    return tracker.timeline
