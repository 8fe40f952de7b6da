"""Buffer sizes as expressions of the step's symbols: trace once per graph structure, then evaluate.

A step's ops and lifetimes depend only on its structure (the LM head's batch, and which op groups
run in more than one chunk: that switches token-local regions from op-by-op to fused); the buffer
sizes depend on the symbols packed tokens T, longest sequence L, logits rows per chunk C, the
sampler's bytes per row S, and one chunk size per chunked op (of all tokens, or the largest of the
sequences' largest chunks). Every size in the model is a constant times a product
of powers of these symbols, so one trace with each symbol set to a distinct large prime (a
sentinel) recovers each dimension's expression by factoring: the sentinel primes divide no
dimension of any config. The first evaluation of a structure is checked against a plain trace of
the same shape; if they differ (a size that is not such a product), that structure keeps being
traced shape by shape.

Evaluating a plan's sizes then costs microseconds instead of a trace's milliseconds, which is what
lets the chunking search try many plans per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from ..device import KernelRules
from ..models.groups import PIECE_GROUPS, Chunks, OpGroup, largest_chunk
from ..models.packing import Packing
from ..models.spec import ArchSpec
from .shapes import StepShape
from .trace import StepGraph, TracedBuffer, TraceMemory, trace_step


def _primes_from(start: int, count: int) -> tuple[int, ...]:
    found: list[int] = []
    n = start
    while len(found) < count:
        if all(n % d for d in range(2, math.isqrt(n) + 1)):
            found.append(n)
        n += 1
    return tuple(found)


# Sentinels: T and L the largest (every chunk must be shorter; the trace packs a sequence of L and
# one of T - L tokens, so L < T < 2L), then C, S and the chunk sizes of one step (a layer template
# has a few dozen chunked ops at most).
LENGTH_SENTINEL = 1_000_003
TOKENS_SENTINEL = _primes_from(1_500_000, 1)[0]
ROWS_SENTINEL, SAMPLER_SENTINEL, *CHUNK_SENTINELS = _primes_from(10_007, 2 + 64)
SEQUENCES = None  # a chunked op over each sequence's queries, recorded instead of its totals


@dataclass(frozen=True)
class Monomial:
    """const * prod(symbol_i ** powers[i]); symbols in the order T, L, C, S, chunk sizes."""

    const: int
    powers: tuple[int, ...]

    @classmethod
    def factor(cls, value: int, sentinels: tuple[int, ...]) -> Monomial:
        powers = []
        for p in sentinels:
            e = 0
            while value and value % p == 0:
                value, e = value // p, e + 1
            powers.append(e)
        return cls(value, tuple(powers))

    def at(self, values: list[int]) -> int:
        n = self.const
        for v, e in zip(values, self.powers, strict=False):
            if e:
                n *= v**e
        return n


class SymbolicMemory(TraceMemory):
    """A trace memory whose chunk sizes are sentinels, remembered with what they divide."""

    def __init__(self, packing: Packing, rules: KernelRules) -> None:
        super().__init__(rules)
        self.packing = packing
        self.chunked: list[tuple[int | None, OpGroup]] = []  # (total rows or SEQUENCES, op group) per chunked op
        self.terms: dict[int, list[int]] = {}  # op -> each workspace declared (a sum of monomials)

    def workspace(self, nbytes: int) -> None:
        super().workspace(nbytes)
        self.terms.setdefault(len(self.ops) - 1, []).append(nbytes)

    def chunk_size(self, totals: tuple[int, ...], group: OpGroup, pieces: int) -> int:
        if len(self.chunked) == len(CHUNK_SENTINELS):
            raise RuntimeError("more chunked ops in one step than symbolic chunk sizes")
        self.chunked.append((SEQUENCES if totals == self.packing.lengths else totals[0], group))
        return CHUNK_SENTINELS[len(self.chunked) - 1]


@dataclass
class SymbolicStep:
    """A traced step whose sizes are expressions: `evaluate` gives the StepGraph of any shape of
    the same structure."""

    graph: StepGraph  # ops, lifetimes and template, traced at the sentinels
    dims: list[tuple[Monomial, ...]]  # per buffer, per dimension
    workspace: dict[int, list[Monomial]]  # per op, the terms its kernels declared
    chunk_sizes: list[tuple[Monomial | None, OpGroup]]  # chunk i: the first of total / pieces (None: of each sequence)

    def evaluate(self, shape: StepShape) -> StepGraph:
        values = [shape.tokens, shape.longest, shape.chunk, shape.sampler_row_bytes]
        for total, group in self.chunk_sizes:
            totals = shape.lengths if total is SEQUENCES else (total.at(values),)
            pieces = getattr(shape.chunks, group.name)
            values.append(max(largest_chunk(n, pieces, group) for n in totals))
        buffers = [
            TracedBuffer(b.index, b.op, tuple(m.at(values) for m in dims), b.dtype, b.last)
            for b, dims in zip(self.graph.buffers, self.dims, strict=True)
        ]
        workspace = {t: sum(m.at(values) for m in terms) for t, terms in self.workspace.items()}
        return replace(self.graph, shape=shape, buffers=buffers, workspace=workspace)


def structure(shape: StepShape) -> tuple:
    """What the ops and lifetimes of a step depend on (besides the model)."""
    return (shape.batch, shape.tensor_ranks, tuple(getattr(shape.chunks, f) > 1 for f in PIECE_GROUPS))


def symbolic_trace(spec: ArchSpec, dtype: torch.dtype, shape: StepShape, rules: KernelRules) -> SymbolicStep:
    """Trace `shape`'s structure once at the sentinels and factor every size."""
    chunks = Chunks(**{f: 2 if getattr(shape.chunks, f) > 1 else 1 for f in PIECE_GROUPS})
    packing = Packing((LENGTH_SENTINEL, TOKENS_SENTINEL - LENGTH_SENTINEL))
    at_sentinels = StepShape(
        packing.lengths, shape.batch, ROWS_SENTINEL, chunks, SAMPLER_SENTINEL, tensor_ranks=shape.tensor_ranks
    )
    memory = SymbolicMemory(packing, rules)
    graph = trace_step(spec, dtype, at_sentinels, memory, packing)
    sentinels = (
        TOKENS_SENTINEL,
        LENGTH_SENTINEL,
        ROWS_SENTINEL,
        SAMPLER_SENTINEL,
        *CHUNK_SENTINELS[: len(memory.chunked)],
    )
    return SymbolicStep(
        graph=graph,
        dims=[tuple(Monomial.factor(d, sentinels) for d in b.shape) for b in graph.buffers],
        workspace={t: [Monomial.factor(n, sentinels) for n in terms] for t, terms in memory.terms.items()},
        chunk_sizes=[
            (total if total is SEQUENCES else Monomial.factor(total, sentinels), group)
            for total, group in memory.chunked
        ],
    )


class StepTracer:
    """StepGraphs by shape for one model: evaluated from a symbolic trace per structure, checked
    once against a plain trace; a structure that fails the check is traced shape by shape."""

    def __init__(self, spec: ArchSpec, dtype: torch.dtype, rules: KernelRules):
        self.spec, self.dtype, self.rules = spec, dtype, rules
        self._steps: dict[tuple, SymbolicStep | None] = {}

    def _trace(self, shape: StepShape) -> StepGraph:
        return trace_step(self.spec, self.dtype, shape, rules=self.rules)

    def graph(self, shape: StepShape) -> StepGraph:
        if shape.cache_keys or shape.masked_keys or shape.ranks > 1:  # windows, masks, a rank's shard: traced
            return self._trace(shape)
        key = structure(shape)
        if key not in self._steps:
            step = symbolic_trace(self.spec, self.dtype, shape, self.rules)
            traced = self._trace(shape)
            self._steps[key] = step if step.evaluate(shape) == traced else None
            return traced
        step = self._steps[key]
        return step.evaluate(shape) if step is not None else self._trace(shape)

    def is_symbolic(self, shape: StepShape) -> bool:
        return self._steps.get(structure(shape)) is not None
