"""Continuous batching: many requests' denoising steps share each forward pass, each exact.

A `Request` is one generation: its resolved settings, its sampler state and the largest step it
will ever take (`worst`: its first step reads the most rows). The `Scheduler` keeps a running batch
and a FIFO of waiting requests. At each step boundary it retires finished and cancelled requests,
then admits waiting ones in order while the batch stays within `max_batch` requests and the plan of
every running request's largest step together with the newcomer's fits the memory budget
(`Executor.plan_batch`; the head of the queue waits rather than being overtaken). Then one step:
every running state says what it reads (`next_step`), the executor runs them in one packed forward
pass (`batch_logits`), and each state advances on its own logits.

Exactness: a request's tokens are those of running it alone. Its random stream is its own
generator; its logits come from kernels whose per-token arithmetic does not depend on the other
sequences in the pass (`kernels/tiles.py`, attention per sequence); its sampler reduces only its
own rows. Failures stay per request: a state that raises fails its request only; a forward pass
that raises fails the requests of that step; the scheduler goes on with the next step.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from .config import GenerationConfig
from .decoding.common import DenoiseResult, GenerationCancelled, SamplerState, StepCallback, StepEvent
from .plan.search import DoesNotFit
from .plan.shapes import RequestShape
from .plan.step_plan import StepPlan
from .runtime import Executor

log = logging.getLogger(__name__)


@dataclass(eq=False)  # identity: requests live in queues and sets
class Request:
    """One generation to run: its state is started when it joins the batch."""

    prompt: torch.Tensor  # (P,) token ids
    config: GenerationConfig  # resolved
    start: Callable[[], SamplerState]  # the sampler state, made when the request joins
    worst: RequestShape  # its largest step to come (at first, the first): what admission plans
    plan: StepPlan | None = None  # that step's plan alone, once planned (`LLM.plan`)
    callback: StepCallback | None = None  # called after each of its steps (False cancels it)
    later: RequestShape | None = None  # its largest step after the first, if smaller (`worst` once it ran)
    cancelled: threading.Event = field(default_factory=threading.Event)
    result: Future = field(default_factory=Future)  # -> (DenoiseResult, seconds) or the error
    state: SamplerState | None = None
    submitted: float = 0.0
    started: float = 0.0
    waited_for_memory: bool = False  # it headed the queue while the batch's plan with it did not fit

    @property
    def sequences(self) -> int:
        return self.worst.batch

    @property
    def tokens(self) -> int:
        return self.worst.batch * self.worst.length


@dataclass(frozen=True)
class StepRecord:
    """One batched step as it ran: its wall time, its requests, and its plan (None: unplanned),
    taken before an idle scheduler releases the plan."""

    seconds: float
    requests: tuple[Request, ...]
    plan: StepPlan | None


@dataclass
class BatchStats:
    """What the scheduler holds now (for /metrics)."""

    running: int = 0
    waiting: int = 0
    sequences: int = 0
    tokens: int = 0
    planned_bytes: int = 0  # predicted peak of the running batch's largest step (0: unplanned)


class Scheduler:
    def __init__(self, executor: Executor, max_batch: int, on_step: Callable[[StepRecord], None] | None = None):
        """`max_batch`: most requests per forward pass (1: one request at a time); `on_step` sees
        each step's record (whoever drives the scheduler; `step` returns it too)."""
        self.check_max_batch(max_batch)
        self.executor, self.max_batch, self.on_step = executor, max_batch, on_step
        self.running: list[Request] = []
        self.waiting: deque[Request] = deque()
        self._lock = threading.Condition()  # guards the queues
        self._stepping = threading.Lock()  # one step at a time, whichever thread drives
        self.stats = BatchStats()
        self.steps_run = 0

    @staticmethod
    def check_max_batch(max_batch: int) -> None:
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise ValueError(f"max_batch must be an integer >= 1, got {max_batch!r}")

    def submit(self, request: Request) -> Future:
        """Queue `request` (thread-safe); it joins the batch at a step boundary."""
        with self._lock:
            request.submitted = time.perf_counter()
            self.waiting.append(request)
            self.stats.waiting = len(self.waiting)
            self._lock.notify_all()
        return request.result

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until a request waits or runs (or `timeout`); True if there is work."""
        with self._lock:
            return self._lock.wait_for(lambda: not self.idle, timeout)

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def run(self, requests: list[Request]) -> None:
        """Step until every one of `requests` has ended (another thread may be stepping too)."""
        while not all(r.result.done() for r in requests):
            self.step()

    def step(self) -> StepRecord | None:
        """Retire cancelled requests, admit what fits, run one batched denoising step, retire what
        ended; the step's record (None: nothing ran)."""
        with self._stepping:
            return self._step()

    def _step(self) -> StepRecord | None:
        self._retire()
        self._admit()
        if not self.running:
            return None
        begin = time.perf_counter()
        batch, inputs = [], []
        for request in self.running:  # a state that cannot say what it reads fails alone
            try:
                inputs.append(request.state.next_step())
                batch.append(request)
            except Exception as exc:
                self._finish(request, error=exc)
        if not batch:
            self._retire()
            return None
        try:
            row_bytes = max(r.worst.sampler_row_bytes for r in batch)
            with self.executor.batch_logits(inputs, row_bytes) as logits:
                for request, read in zip(batch, logits, strict=True):
                    self._advance(request, read)
        except Exception as exc:  # the forward pass failed: every request of the step fails
            log.exception("a batched step of %d requests failed", len(batch))
            for request in batch:
                self._finish(request, error=exc)
        self.steps_run += 1
        record = StepRecord(time.perf_counter() - begin, tuple(batch), self.executor.last_plan)
        if self.on_step is not None:
            self.on_step(record)
        self._retire()
        return record

    def _advance(self, request: Request, read) -> None:
        if request.result.done():
            return
        if request.later is not None:  # past its first step: admission counts what is left
            request.worst, request.later = request.later, None
        try:
            event: StepEvent = request.state.advance(read)
            if request.callback is not None and request.callback(event) is False:
                request.cancelled.set()
        except Exception as exc:
            self._finish(request, error=exc)

    def _retire(self) -> None:
        for request in list(self.running):
            if not request.result.done() and request.cancelled.is_set():
                steps = request.state.steps_run
                self._finish(request, error=GenerationCancelled(f"generation cancelled at step {steps}"))
            elif not request.result.done() and request.state.done:
                self._finish(request)
        with self._lock:
            self.running = [r for r in self.running if not r.result.done()]
            self._update_stats()
        if self.idle:
            self.executor.release()  # the arena goes back when nothing runs

    def _finish(self, request: Request, error: BaseException | None = None) -> None:
        if request.result.done():
            return
        if error is not None:
            request.result.set_exception(error)
        else:
            result: DenoiseResult = request.state.result()
            request.result.set_result((result, time.perf_counter() - request.started))

    def _admit(self) -> None:
        with self._lock:
            while self.waiting and len(self.running) < self.max_batch:
                request = self.waiting[0]
                if request.cancelled.is_set():
                    self.waiting.popleft()
                    request.result.set_exception(GenerationCancelled("cancelled before it started"))
                    continue
                if self.running and not self._fits([r.worst for r in self.running] + [request.worst]):
                    request.waited_for_memory = True
                    break  # first in, first served: the head waits for room
                self.waiting.popleft()
                try:
                    request.state = request.start()
                except Exception as exc:
                    request.result.set_exception(exc)
                    continue
                request.started = time.perf_counter()
                self.running.append(request)
            self._update_stats()

    def _fits(self, shapes: list[RequestShape]) -> bool:
        try:
            self.executor.plan_batch(shapes)
        except DoesNotFit:
            return False
        return True

    def _update_stats(self) -> None:
        running = self.running
        planned = 0
        if running:
            try:
                plan = self.executor.plan_batch([r.worst for r in running])
                planned = plan.predicted_peak_bytes if plan is not None else 0
            except DoesNotFit:  # a lone request that was admitted alone always fits
                planned = 0
        self.stats = BatchStats(
            running=len(running),
            waiting=len(self.waiting),
            sequences=sum(r.sequences for r in running),
            tokens=sum(r.tokens for r in running),
            planned_bytes=planned,
        )
