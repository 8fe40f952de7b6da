"""The op graph of one mask-only denoising step, traced from the model description itself.

`trace_step` runs `models.transformer` with the planned kernels on the meta device: nothing is computed
and no memory is used, but every op declares what it reads and every activation it writes comes
from `TraceMemory.new`. That yields the ops in execution order, each buffer's size, dtype, shape
and lifetime (first write to last read), and the kernel workspace outside the arena. Shapes are
functions of the step's symbols (`StepShape`: batch, sequence length, logits rows per chunk, chunk
counts) and of the spec; a trace evaluates them for one shape (milliseconds, meta tensors), and
`plan/symbolic.py` turns one trace per structure into expressions evaluated in microseconds.

Layers that are alike are traced once: the step is prefix (embedding, rotary tables), one layer
template repeated `num_layers` times, and tail (final norm, LM head over row chunks). Buffers of
the prefix read inside the layer (the residual stream, the rotary tables) live across the whole
template; nothing written inside a layer may be read after it (checked), so one layer's plan
serves every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import torch

from ..device import KernelRules, profile_for
from ..kernels.planned import PlannedOps
from ..kernels.sequence_parallel import PlannedSequenceParallelOps
from ..kernels.tensor_parallel import gathered, shard_rows
from ..models import transformer
from ..models.groups import OpGroup, largest_chunk
from ..models.packing import Packing
from ..models.quantized import QuantizedWeight, quantized_weights
from ..models.spec import ArchSpec
from ..models.weights import file_shapes
from .shapes import StepShape

PREFIX_OPS = ("embed", "rotary_tables")
TAIL_OPS = ("final_norm", "lm_head")


@dataclass
class TracedBuffer:
    index: int  # allocation order within the traced step
    op: int  # op that writes it first
    shape: tuple[int, ...]
    dtype: torch.dtype
    last: int  # last op that reads it

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class StepGraph:
    shape: StepShape
    ops: list[str]  # op names in execution order (prefix, one layer template, tail)
    groups: list[str]  # per op: its op group (models/groups.py)
    buffers: list[TracedBuffer]
    workspace: dict[int, int]  # op -> bytes its kernel allocates outside the arena
    prefix_allocs: int  # allocations before the layer template
    template_allocs: int  # allocations of one repetition of the template
    repeats: int  # how many times the template runs (layers / traced layers)
    template_ops: tuple[int, int] = field(default=(0, 0))  # [first, last] op index of the template

    def template_index(self, allocation: int) -> int:
        """Which traced buffer the `allocation`-th allocation of a full step uses."""
        p, k = self.prefix_allocs, self.template_allocs
        if allocation < p:
            return allocation
        if allocation < p + k * self.repeats:
            return p + (allocation - p) % k
        return allocation - k * (self.repeats - 1)

    @property
    def allocations_per_step(self) -> int:
        return len(self.buffers) + self.template_allocs * (self.repeats - 1)

    def group(self, op: int) -> str:
        return self.groups[op]


class TraceMemory:
    """`kernels.memory.Memory` that records instead of placing: meta tensors, lifetimes, workspace."""

    tracing = True

    def __init__(self, rules: KernelRules) -> None:
        self.device, self.rules = torch.device("meta"), rules
        self.ops: list[str] = []
        self.groups: list[str] = []
        self.buffers: list[TracedBuffer] = []
        self.workspace_bytes: dict[int, int] = {}
        self._owner: dict[int, int] = {}  # storage -> buffer index
        self._keep: list[torch.Tensor] = []  # keeps storages alive so their keys stay unique

    def op(self, name: str, group: str, *reads: torch.Tensor) -> None:
        self.ops.append(name)
        self.groups.append(group)
        t = len(self.ops) - 1
        for x in reads:
            index = self._owner.get(x.untyped_storage()._cdata)
            if index is not None:
                self.buffers[index].last = t

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        t = len(self.ops) - 1
        tensor = torch.empty(shape, dtype=dtype, device=self.device)
        self._owner[tensor.untyped_storage()._cdata] = len(self.buffers)
        self._keep.append(tensor)
        self.buffers.append(TracedBuffer(len(self.buffers), t, tuple(shape), dtype, t))
        return tensor

    def workspace(self, nbytes: int) -> None:
        t = len(self.ops) - 1
        self.workspace_bytes[t] = self.workspace_bytes.get(t, 0) + nbytes

    def chunk_size(self, totals: tuple[int, ...], group: OpGroup, pieces: int) -> int:
        return max(largest_chunk(total, pieces, group) for total in totals)


def uniform_layers(spec: ArchSpec) -> bool:
    return all(spec.is_moe_layer(i) == spec.is_moe_layer(0) for i in range(spec.num_layers))


def meta_weights(spec: ArchSpec, dtype: torch.dtype):
    """Shapes-only weights, quantized as `spec.quantization` says (the kernels' workspace depends on it)."""
    state = {name: torch.empty(shape, dtype=dtype, device="meta") for name, shape in file_shapes(spec).items()}
    return quantized_weights(spec, state, lambda t, scheme: QuantizedWeight.meta(scheme, tuple(t.shape), dtype))


def trace_step(
    spec: ArchSpec,
    dtype: torch.dtype,
    shape: StepShape,
    memory: TraceMemory | None = None,
    packing: Packing | None = None,
    rules: KernelRules | None = None,
) -> StepGraph:
    """Trace one mask-only step (body, then one chunk of `shape.chunk` logits rows of a request of
    `shape.batch` sequences) on the meta device; `packing` (default: the shape's lengths) lets the
    symbolic trace pick its sentinel lengths; `rules`: the device the step will run on (default
    this machine's CPU; call sizes, attention blocks and kernel workspace depend on it). With
    `shape.ranks` > 1, one rank's part of a sequence-parallel step (every rank's is alike); with
    `shape.tensor_ranks` > 1, a tensor-parallel rank's (1/N of each linear weight's rows)."""
    traced = spec
    if uniform_layers(spec) and spec.num_layers > 1:
        moe = spec.moe and replace(spec.moe, moe_layers=spec.moe.moe_layers[:1])
        traced = replace(spec, num_layers=1, moe=moe)
    memory = memory or TraceMemory(rules or profile_for("cpu").rules(dtype))
    if shape.ranks > 1:
        ops = PlannedSequenceParallelOps(memory, shape.chunks, shape.ranks)
    else:
        ops = PlannedOps(memory, shape.chunks)
    packing = packing or shape.trace_packing(spec)
    ids = torch.empty((1, packing.tokens), dtype=torch.long, device="meta")
    rows = torch.empty((shape.chunk,), dtype=torch.long, device="meta")
    weights = meta_weights(traced, dtype)
    if shape.tensor_ranks > 1:  # one rank's part: its weights' rows, products gathered
        weights = gathered(*shard_rows(traced, weights, 0, shape.tensor_ranks), shape.tensor_ranks)
    head = transformer.forward(ops, traced, weights, ids, packing, shape.batch, shape.chunk)
    for _ in head(0, shape.batch, rows):
        memory.workspace(shape.chunk * shape.sampler_row_bytes)  # the sampler's temporaries per chunk
    return _layer_template(memory, shape, repeats=spec.num_layers // traced.num_layers)


def _layer_template(memory: TraceMemory, shape: StepShape, repeats: int) -> StepGraph:
    names = memory.ops
    body = [t for t, n in enumerate(names) if n not in PREFIX_OPS + TAIL_OPS]
    first, last = body[0], body[-1]
    for b in memory.buffers:
        if b.op < first and b.last >= first:  # read by the layer: needed by every repetition
            b.last = max(b.last, last)
        if first <= b.op <= last and b.last > last:
            raise AssertionError(f"buffer {b.index} written by {names[b.op]} is read after its layer")
    prefix = sum(b.op < first for b in memory.buffers)
    template = sum(first <= b.op <= last for b in memory.buffers)
    return StepGraph(
        shape, names, memory.groups, memory.buffers, memory.workspace_bytes, prefix, template, repeats, (first, last)
    )
