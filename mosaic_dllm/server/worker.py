"""Admission and execution: plan each request before accepting it, run accepted ones batched.

`GenerationWorker.admit` runs on the event loop with a request the engine resolved and checked
(`LLM.request`). It plans the request's largest step against the memory budget (`LLM.plan`, in a
thread): a request that can never fit is refused at once (`DoesNotFit`, with the longest length
that would fit); one that fits takes a slot (`QueueFull` when `max_batch` run and `max_queue` wait
already). `run` hands it to the engine's scheduler (`scheduler.py`), which a single engine
thread drives step by step: a request joins the running batch at a step boundary when the
batch's plan with it fits the budget, and leaves when it ends. The event loop never blocks on a
step. Each job carries a cancel flag the scheduler reads at every step boundary: a client that
goes away stops its own generation, never the others'.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..decoding.common import StepEvent
from ..engine import LLM, GenerationOutput
from ..scheduler import Request
from .metrics import Metrics

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Every queue slot is taken; the client should retry later."""


class ServerShuttingDown(RuntimeError):
    """The server stops: new requests are refused and running ones cancelled."""


@dataclass(eq=False)  # identity: jobs live in a set
class Job:
    request: Request  # resolved and planned once (`LLM.request`, `LLM.plan`)
    on_step: Callable[[StepEvent], None] | None = None  # called from the engine thread

    @property
    def cancelled(self) -> threading.Event:
        return self.request.cancelled

    def admission(self, budget: int | None) -> dict:
        """How the request got in: its settings, its largest step's plan against the budget, and
        how long it waited (for memory or a batch slot) before its first step."""
        r = self.request
        summary = r.plan.summary() if r.plan is not None else {}
        return {
            "settings": r.config.given(),
            "predicted_peak_bytes": r.plan.predicted_peak_bytes if r.plan is not None else None,
            "budget_bytes": budget,
            "chunks": summary.get("chunks"),
            "peak_group": summary.get("peak_group"),
            "queued_seconds": round(max(0.0, r.started - r.submitted), 3),
            "waited_for_memory": r.waited_for_memory,
        }

    def step_done(self, event: StepEvent) -> bool:
        if self.on_step is not None:
            self.on_step(event)
        return not self.cancelled.is_set()


class GenerationWorker:
    def __init__(self, llm: LLM, max_queue: int, metrics: Metrics):
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.llm, self.max_queue, self.metrics = llm, max_queue, metrics
        self.scheduler = llm.scheduler
        self._jobs: set[Job] = set()  # admitted (a slot held), not finished
        self.shutting_down = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="mosaic-engine", daemon=True)
        self._thread.start()

    @property
    def running(self) -> int:
        return self.scheduler.stats.running

    @property
    def waiting(self) -> int:
        """Admitted jobs that have not joined the batch yet (read from the jobs themselves, never
        below zero while the scheduler catches up with a cancellation)."""
        return sum(1 for job in list(self._jobs) if not job.request.started)

    def check_room(self) -> None:
        """QueueFull when every batch and queue slot is taken: checked before a request is planned
        (so a busy server answers at once) and again when it takes its slot."""
        if len(self._jobs) >= self.scheduler.max_batch + self.max_queue:
            running = len(self._jobs) - self.waiting
            raise QueueFull(
                f"{running} requests running (batch {self.scheduler.max_batch}) and {self.waiting} waiting "
                f"(queue {self.max_queue})"
            )

    async def admit(self, request: Request) -> Job:
        """Plan the request's largest step (in a thread: planning never stalls the event loop),
        then take a slot for it (on the event loop, so slots are counted one admission at a time);
        `run` gives the slot back when the job ends.

        Raises DoesNotFit (never fits the budget), QueueFull, or ServerShuttingDown.
        """
        if self.shutting_down:
            raise ServerShuttingDown("the server is shutting down")
        self.check_room()
        await asyncio.get_running_loop().run_in_executor(None, self.llm.plan, request)
        if self.shutting_down:
            raise ServerShuttingDown("the server is shutting down")
        self.check_room()
        job = Job(request)
        request.callback = job.step_done
        self._jobs.add(job)
        self.metrics.queue_length.set(self.waiting)
        return job

    async def run(self, job: Job) -> GenerationOutput:
        """Run an admitted job in the batch; raises GenerationCancelled if cancelled."""
        try:
            await asyncio.wrap_future(self.scheduler.submit(job.request))
            return self.llm.output(job.request)
        finally:
            self._jobs.discard(job)
            self.metrics.queue_length.set(self.waiting)

    def _loop(self) -> None:
        """The engine thread: one batched step after another while there is work."""
        while not (self._stop.is_set() and self.scheduler.idle):
            if not self.scheduler.wait_for_work(timeout=0.25):
                continue
            try:
                record = self.scheduler.step()
            except Exception:  # the scheduler fails requests, never itself; keep serving regardless
                log.exception("the scheduler failed a step")
            else:
                if record is not None:
                    self.metrics.step_latency.observe(record.seconds)
            self.metrics.observe_batch(self.scheduler.stats, self.llm)

    def begin_shutdown(self) -> None:
        """Refuse new work and cancel queued and running work at its next step (signal-safe)."""
        if not self.shutting_down:
            if lost := self.llm.check_ranks():  # across ranks: say why the launcher stops us
                log.error("stopping: %s", lost)
            log.warning("stopping: cancelling %d admitted requests at their next step", len(self._jobs))
        self.shutting_down = True
        for job in list(self._jobs):
            job.cancelled.set()
        self._stop.set()
        self.scheduler.wake()

    def shutdown(self) -> None:
        """Cancel everything, then wait for the engine thread (it stops at the running step's end)."""
        self.begin_shutdown()
        self._thread.join()
