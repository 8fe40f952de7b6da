"""Serving across ranks: rank 0 runs the server, the scheduler and the samplers; the other ranks
follow. Every executor call that runs collectives is first announced to them as a few int64
tensors (no pickled objects), so they make the same calls in the same order.

A step's block cache use (Fast-dLLM's caches, block diffusion's K/V cache) is announced with it:
the cache by a number the lead gives each cache, its size and how the step uses it. A follower
keeps a cache of its own under that number (its heads' K and V, as its executor stores them) for
as long as the lead's steps name it: every running request takes part in every step, so a cache
no step names any more belonged to a request that ended."""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import Tensor

from ..memory.rss import current_rss_bytes
from ..models.kv_cache import BlockCache, CacheUse
from .executor import RowChunks, StepInput, StepLogits, single_step
from .mosaic import MosaicExecutor

log = logging.getLogger(__name__)

NOOP, STEP, INPUT, READ, END, RELEASE, STOP, PING = range(8)
HEARTBEAT_SECONDS = 10.0  # an idle lead pings this often, well inside any --rank-timeout


class RanksLost(RuntimeError):
    """Another rank died or stopped answering (past the group's timeout): nothing can run any more."""


def collective_failure(error: RuntimeError) -> str | None:
    """What a collective that failed because another rank died or hung says, as one line (gloo and
    NCCL raise RuntimeErrors naming themselves); None for any other error."""
    text = str(error).strip()
    if not isinstance(error, dist.DistError) and "gloo" not in text and "NCCL" not in text:
        return None
    first = text.splitlines()[0] if text else type(error).__name__
    return f"another rank died or stopped answering ({first[:300]})"


NO_USE = [-1] * 8  # a step that uses no cache


def cache_use_fields(use: CacheUse, number: int) -> list[int]:
    """A step's cache use as the int64s a follower rebuilds it from (`followed_use`); `number` -1:
    a use that keeps nothing (`CacheUse.cache` None)."""
    positions, int8 = (use.cache.positions, int(use.cache.int8)) if use.cache is not None else (0, 0)
    return [number, positions, int8, int(use.refresh), use.start, use.length, use.keep, use.block]


class LeadExecutor:
    """Rank 0's executor when serving across ranks: announces each step (its requests' cache uses
    included), each read of a request's logits (read to its end, as the followers read it) and
    each release, then runs it; between steps a heartbeat keeps the followers' collectives from
    timing out. Everything else is the wrapped executor's."""

    def __init__(self, executor: MosaicExecutor, group: dist.ProcessGroup | None = None):
        self.executor, self.group, self.group_size = executor, group, dist.get_world_size(group)
        self._cache_numbers: weakref.WeakKeyDictionary[BlockCache, int] = weakref.WeakKeyDictionary()
        self._next_number = 0  # never reused: a follower may still hold an ended request's cache
        self._lock = threading.RLock()  # one announcement sequence at a time
        self._stopped = threading.Event()
        self.lost: str | None = None  # what a failed collective said: every later call fails at once
        self.rank_memory: list[dict[str, int]] = []  # per rank after the last step: RSS and arena bytes
        threading.Thread(target=self._heartbeat, name="mosaic-ranks-heartbeat", daemon=True).start()

    def __getattr__(self, name: str):
        return getattr(self.executor, name)

    def _send(self, kind: int, *values: int) -> None:
        dist.broadcast(torch.tensor([kind, *values, *[0] * (3 - len(values))]), src=0, group=self.group)

    @contextmanager
    def _collectives(self) -> Iterator[None]:
        """Hold the announcement lock; a collective that fails because a rank is gone -> RanksLost."""
        with self._lock:
            if self.lost:
                raise RanksLost(self.lost)
            try:
                yield
            except RuntimeError as exc:
                if isinstance(exc, RanksLost) or (said := collective_failure(exc)) is None:
                    raise
                self.lost = said
                raise RanksLost(said) from None

    def check_ranks(self) -> str | None:
        """Whether the other ranks still answer (a ping every rank answers with a barrier, which a
        dead rank fails at once): what was lost, or None. Waits for a running step to end."""
        try:
            with self._collectives():
                if not self._stopped.is_set():
                    self._send(PING)
                    dist.barrier(group=self.group)
        except RanksLost:
            pass
        return self.lost

    def _heartbeat(self) -> None:
        while not self._stopped.wait(HEARTBEAT_SECONDS):
            if self.check_ranks():
                log.error("the other ranks are gone: %s", self.lost)
                return

    def row_logits(self, ids: Tensor, rows: Tensor, sampler_row_bytes: int = 0, cache: CacheUse | None = None):
        return single_step(self, StepInput(ids, rows, cache), sampler_row_bytes)

    @contextmanager
    def batch_logits(
        self, steps: Sequence[StepInput], sampler_row_bytes: int = 0, as_one_batch: bool = False
    ) -> Iterator[list[StepLogits]]:
        steps = [StepInput(*step) for step in steps]
        with self._collectives():
            self._send(STEP, len(steps), sampler_row_bytes, int(as_one_batch))
            for step in steps:
                self._send(INPUT, *step.ids.shape, step.rows.numel())
                use = NO_USE if step.cache is None else cache_use_fields(step.cache, self._number(step.cache.cache))
                for t in (step.ids, step.rows, torch.tensor(use)):
                    dist.broadcast(t.to(torch.long).contiguous(), src=0, group=self.group)
            try:
                with self.executor.batch_logits(steps, sampler_row_bytes, as_one_batch) as logits:
                    yield [self._announced(i, read) for i, read in enumerate(logits)]
            finally:
                self._send(END)
                self.rank_memory = every_ranks_memory(self.executor, self.group)

    def _number(self, cache: BlockCache | None) -> int:
        """The number the followers know this cache by (-1: none)."""
        if cache is None:
            return -1
        if cache not in self._cache_numbers:
            self._cache_numbers[cache], self._next_number = self._next_number, self._next_number + 1
        return self._cache_numbers[cache]

    def _announced(self, index: int, read: StepLogits) -> StepLogits:
        def announced() -> RowChunks:
            with self._collectives():
                self._send(READ, index)
                chunks = read()
                try:
                    yield from chunks
                finally:
                    for _ in chunks:  # the followers read every chunk: so does the lead
                        pass

        return announced

    def release(self) -> None:
        with self._collectives():
            self._send(RELEASE)
            self.executor.release()

    def stop(self) -> None:
        """Tell the followers to return (the server stops); followers already gone are logged."""
        self._stopped.set()
        try:
            with self._collectives():
                self._send(STOP)
        except RanksLost as exc:
            log.warning("the other ranks could not be told to stop: %s", exc)


def every_ranks_memory(executor: MosaicExecutor, group: dist.ProcessGroup | None) -> list[dict[str, int]]:
    """Each rank's RSS and committed arena bytes now (every rank calls it after each step)."""
    mine = torch.tensor([current_rss_bytes(), executor.committed_bytes])
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [{"rss_bytes": int(m[0]), "arena_committed_bytes": int(m[1])} for m in every]


def follow(executor: MosaicExecutor, group: dist.ProcessGroup | None = None) -> None:
    """A rank other than 0 while rank 0 serves: make every executor call rank 0 announces, until it
    stops; keep a copy of each running request's block cache."""
    caches: dict[int, BlockCache] = {}

    def followed_use(fields: list[int]) -> CacheUse | None:
        number, positions, int8, refresh, start, length, keep, block = fields
        if fields == NO_USE:
            return None
        if number < 0:
            return CacheUse(None, bool(refresh), start, length, keep, block)
        if number not in caches:
            caches[number] = BlockCache(executor.spec, positions, int8=bool(int8))
        return CacheUse(caches[number], bool(refresh), start, length, keep, block)

    def receive() -> list[int]:
        header = torch.zeros(4, dtype=torch.long)
        dist.broadcast(header, src=0, group=group)
        return header.tolist()

    while True:
        kind, count, row_bytes, as_one_batch = receive()
        if kind == STOP:
            return
        if kind == RELEASE:
            executor.release()
        if kind == PING:
            dist.barrier(group=group)
        if kind != STEP:
            continue
        steps, named = [], set()
        for _ in range(count):
            _, batch, length, rows = receive()
            ids, read = torch.empty((batch, length), dtype=torch.long), torch.empty((rows,), dtype=torch.long)
            use = torch.empty(8, dtype=torch.long)
            for t in (ids, read, use):
                dist.broadcast(t, src=0, group=group)
            fields = use.tolist()
            named.add(fields[0])
            steps.append(StepInput(ids, read, followed_use(fields)))
        for number in set(caches) - named:  # their requests ended
            caches.pop(number).release()
        try:
            with executor.batch_logits(steps, row_bytes, bool(as_one_batch)) as logits:
                while (command := receive())[0] == READ:
                    for _ in logits[command[1]]():
                        pass
        except Exception:  # the lead met the same error (the ranks plan and run alike): wait for its END
            log.exception("a followed step failed")
            while receive()[0] != END:
                pass
        every_ranks_memory(executor, group)
