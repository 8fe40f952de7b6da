"""Admission and execution: plan each request before accepting it, run accepted ones one at a time.

`GenerationWorker.admit` runs on the event loop. It plans the request's largest step against the
engine's memory budget (`LLM.check_memory`): a request that can never fit is refused at once
(`DoesNotFit`, with the longest length that would fit); one that fits waits for the engine in a
bounded queue (`QueueFull` when it is full); `run` then awaits the engine thread. A single worker
thread runs the engine, so the event loop never blocks on a denoising step. Each job carries a
cancel flag that the step callback reads: a client that goes away stops its generation at the next
step, and the engine releases the arena.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..config import GenerationConfig
from ..decoding.common import GenerationCancelled, StepEvent
from ..engine import LLM, GenerationOutput
from .metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every queue slot is taken; the client should retry later."""


class ServerShuttingDown(RuntimeError):
    """The server stops: new requests are refused and running ones cancelled."""


@dataclass(eq=False)  # identity: jobs live in a set
class Job:
    prompt_ids: list[int]
    config: GenerationConfig
    on_step: Callable[[StepEvent], None] | None = None  # called from the worker thread
    cancelled: threading.Event = field(default_factory=threading.Event)
    planned_bytes: int = 0


class GenerationWorker:
    def __init__(self, llm: LLM, max_queue: int, metrics: Metrics):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.llm, self.max_queue, self.metrics = llm, max_queue, metrics
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mosaic-engine")
        self._jobs: set[Job] = set()  # admitted (a queue slot held), not finished
        self.running: Job | None = None
        self.shutting_down = False

    @property
    def waiting(self) -> int:
        return len(self._jobs) - (self.running is not None)

    async def admit(self, prompt_ids: list[int], config: GenerationConfig) -> Job:
        """Plan the request's largest step (in a thread: planning never stalls the event loop), then
        take a queue slot for it (on the event loop, so slots are counted one admission at a time);
        `run` gives the slot back when the job ends.

        Raises DoesNotFit (never fits the budget), QueueFull, or ServerShuttingDown.
        """
        if self.shutting_down:
            raise ServerShuttingDown("the server is shutting down")
        plan = await asyncio.get_running_loop().run_in_executor(None, self.llm.check_memory, len(prompt_ids), config)
        if self.shutting_down:
            raise ServerShuttingDown("the server is shutting down")
        if len(self._jobs) > self.max_queue:  # one running plus max_queue waiting
            raise QueueFull(f"{self.waiting} requests are waiting (queue size {self.max_queue})")
        job = Job(prompt_ids, config, planned_bytes=plan.predicted_peak_bytes if plan is not None else 0)
        self._jobs.add(job)
        self.metrics.queue_length.set(self.waiting)
        return job

    async def run(self, job: Job) -> GenerationOutput:
        """Run an admitted job when the engine is free; raises GenerationCancelled if cancelled."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, self._generate, job)
        finally:
            self._jobs.discard(job)
            self.metrics.queue_length.set(self.waiting)

    def _generate(self, job: Job) -> GenerationOutput:
        if job.cancelled.is_set() or self.shutting_down:
            raise GenerationCancelled("the client went away before the request started")
        self.running = job
        self.metrics.planned_bytes.set(job.planned_bytes)
        last = time.perf_counter()

        def callback(event: StepEvent) -> bool:
            nonlocal last
            now = time.perf_counter()
            self.metrics.step_latency.observe(now - last)
            last = now
            if job.on_step is not None:
                job.on_step(event)
            return not job.cancelled.is_set()

        try:
            return self.llm.generate(job.prompt_ids, job.config, callback=callback)[0]
        finally:
            self.running = None
            self.metrics.observe_memory(self.llm)

    def begin_shutdown(self) -> None:
        """Refuse new work and cancel queued and running work at its next step (signal-safe)."""
        if not self.shutting_down:
            log.warning("stopping: cancelling %d admitted requests at their next step", len(self._jobs))
        self.shutting_down = True
        for job in list(self._jobs):
            job.cancelled.set()

    def shutdown(self) -> None:
        """Cancel everything, then wait for the engine thread (it stops at the running step's end)."""
        self.begin_shutdown()
        self._pool.shutdown(wait=True, cancel_futures=False)
