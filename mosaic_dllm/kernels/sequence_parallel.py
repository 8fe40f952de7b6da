"""Sequence parallel kernels: each rank of a torch.distributed group holds a shard of the step's
packed tokens; attention runs by heads (Ulysses-style). `PlannedSequenceParallelOps` plans it
(below); `SequenceParallelOps` runs it eagerly, the oracle:

Token-local ops (embedding, norms, projections, FFN / MoE) run as `EagerOps` on the rank's own
tokens. Rotary rotates them by their positions in the whole packing. Attention turns token shards
into head shards with one all-to-all per tensor (each rank then holds every token of its heads,
and the kv heads those need), attends per sequence over every query and key, and turns the output
back into token shards with another all-to-all. The final hidden states are gathered for the LM
head. A token's arithmetic is the one-process eager arithmetic wherever the device profile says a
GEMM's rows do not depend on the call's row count and attention's on its head count (tests).

Shards are equal (`per` tokens, the last zero-padded for the collectives, which gloo needs equal).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from ..models.groups import Chunks
from ..models.ops import RowHead
from ..models.packing import Packing
from ..models.spec import ArchSpec
from .attention import REGION_ROWS, RegionRows
from .eager import EagerOps
from .memory import Memory
from .planned import PlannedOps


def share(tokens: int, world: int) -> int:
    """Tokens each rank holds: ceil(tokens / world) (the last rank's, zero-padded to it)."""
    return -(-tokens // world)


def shard(tokens: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the packed tokens rank `rank` of `world` holds (the last may be shorter or empty)."""
    per = share(tokens, world)
    return min(rank * per, tokens), min((rank + 1) * per, tokens)


def check_heads(num_heads: int, num_kv_heads: int, world: int) -> None:
    """Heads split evenly over the ranks, each rank's query heads reading whole kv groups (or one kv head)."""
    group = num_heads // num_kv_heads
    per_rank = num_heads // world if num_heads % world == 0 else 0
    if not per_rank or not (per_rank % group == 0 or group % per_rank == 0):
        raise ValueError(
            f"sequence parallel over {world} ranks needs {num_heads} attention heads ({num_kv_heads} key/value "
            f"heads) to split evenly: use a number of ranks dividing {num_heads} whose share of heads reads "
            "whole key/value groups"
        )


def head_slices(q_heads: int, kv_heads: int, world: int) -> tuple[list[slice], list[slice]]:
    """Per rank, the query heads it attends with and the kv heads those read (whole groups, or one)."""
    per_rank, group = q_heads // world, q_heads // kv_heads
    count = max(1, per_rank // group)
    queries = [slice(r * per_rank, (r + 1) * per_rank) for r in range(world)]
    return queries, [slice(r * per_rank // group, r * per_rank // group + count) for r in range(world)]


class SequenceParallelOps(EagerOps):
    """`models.ops.Ops` on this rank's shard of a step's packed tokens, over `group`: `embed` takes
    the whole step's (1, T) ids and keeps this rank's shard; every later op sees the shard."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.tokens = self.start = self.end = self.per = 0

    def embed(self, ids: Tensor, table: Tensor, *, name: str) -> Tensor:
        self.tokens = ids.shape[1]
        self.start, self.end = shard(self.tokens, self.rank, self.world)
        self.per = share(self.tokens, self.world)
        return super().embed(ids[:, self.start : self.end], table, name=name)

    def _padded(self, t: Tensor, tokens: int) -> Tensor:
        if t.shape[1] == tokens:
            return t.contiguous()
        return torch.cat((t, t.new_zeros((1, tokens - t.shape[1], *t.shape[2:]))), dim=1)

    def _exchange(self, parts: list[Tensor]) -> list[Tensor]:
        outs = [torch.empty_like(parts[0]) for _ in range(self.world)]
        dist.all_to_all(outs, [p.contiguous() for p in parts], group=self.group)
        return outs

    def _to_heads(self, t: Tensor, heads: list[slice]) -> Tensor:
        """(1, local tokens, h, d) -> (1, T, this rank's heads, d): every token of its heads."""
        t = self._padded(t, self.per)
        return torch.cat(self._exchange([t[:, :, s] for s in heads]), dim=1)[:, : self.tokens]

    def rotary(
        self, x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool, packing: Packing, *, name: str
    ) -> Tensor:
        return self.rotate(x, cos, sin, full_precision, packing.positions(x.device)[self.start : self.end])

    def attention(self, q: Tensor, k: Tensor, v: Tensor, packing: Packing, layer: int, *, name: str) -> Tensor:
        """Every token's q, K and V of this rank's heads, the eager attention on them (block caches
        included: a rank's cache keeps its heads), the outputs back to their tokens' ranks."""
        queries, keys = head_slices(q.shape[2], k.shape[2], self.world)
        qh = self._to_heads(q, queries)
        kh, vh = (self._to_heads(t, keys) for t in (k, v))
        out = super().attention(qh, kh, vh, packing, layer, name=name)  # (1, T, this rank's heads * hd)
        out = self._padded(out, self.per * self.world)
        back = self._exchange(list(out.split(self.per, dim=1)))  # rank r's heads of my tokens
        return torch.cat(back, dim=2)[:, : self.end - self.start]

    def gather(self, local: Tensor) -> Tensor:
        """(1, local tokens, ...) from every rank -> (1, T, ...) on every rank."""
        mine = self._padded(local, self.per)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine, group=self.group)
        return torch.cat(parts, dim=1)[:, : self.tokens]

    def lm_head(
        self, hidden: Tensor, weight: Tensor, packing: Packing, batch: int, chunk: int, *, name: str
    ) -> RowHead:
        """The final hidden states gathered, then the eager head on every rank (each can sample)."""
        return super().lm_head(self.gather(hidden), weight, packing, batch, chunk, name=name)


class PlannedSequenceParallelOps(PlannedOps):
    """`PlannedOps` on this rank's shard of the step's packed tokens: every buffer is planned, per
    rank, by the same trace (`plan/trace.py` with `StepShape.ranks`), so a rank's step fits its own
    budget and the chunking search works on it unchanged.

    Every rank holds `per` = ceil(T / ranks) tokens (the last zero-padded: fewer than `ranks`
    padding tokens in all, computed and never read), so the ranks run one plan. Attention always
    runs as a sharded region: K and V of the rank's tokens, `REGION_ROWS` at a time, are exchanged
    into every token's K and V of the rank's heads (1/ranks of one device's); then for each query
    block of the one-process plan (the attention group's chunks, the device's blocks) the owners
    of its rows compute their queries, an all-to-all hands each rank its heads' queries of the
    whole block, each rank attends, and a second all-to-all brings the outputs back to the owners
    for the output projection and residual add. At its most chunked a rank holds its residual
    stream, K and V of its heads and one block's buffers: the exact floor divided by the ranks.
    The LM head gathers only the rows the sampler reads. A trace (no `group`) runs no collectives."""

    def __init__(self, memory: Memory, chunks: Chunks | None, world: int, rank: int = 0, group=None):
        super().__init__(memory, chunks)
        self.world, self.rank, self.group = world, rank, group
        self.tokens = self.per = self.start = 0

    def attention_in_query_blocks(self) -> bool:
        return True  # attention always runs as the sharded region; rotary inside it, no full tables

    def embed(self, ids: Tensor, table: Tensor, *, name: str) -> Tensor:
        self.tokens = ids.shape[1]
        self.per = share(self.tokens, self.world)
        self.start = shard(self.tokens, self.rank, self.world)[0]
        return super().embed(self._local(ids), table, name=name)

    def _local(self, t: Tensor) -> Tensor:
        """This rank's `per` entries of a (1, T) tensor, zero-padded."""
        mine = t[:, self.start : self.start + self.per]
        return F.pad(mine, (0, self.per - mine.shape[1])) if mine.shape[1] < self.per else mine

    def token_positions(self, packing: Packing, device: torch.device) -> Tensor:
        self.mem.workspace(packing.tokens * 8 + self.per * 8)
        if self.mem.tracing:
            return torch.empty((self.per,), dtype=torch.long, device=device)
        if self._positions_of is None or self._positions_of[0] is not packing:
            self._positions_of = (packing, self._local(packing.positions(device)[None])[0])
        return self._positions_of[1]

    def _owned(self, first: int, last: int) -> list[int]:
        """How many of packed rows [first, last) each rank holds."""
        return [max(0, min(last, (r + 1) * self.per) - max(first, r * self.per)) for r in range(self.world)]

    def attention_region(
        self, x: Tensor, spec: ArchSpec, layer: dict[str, Tensor], index: int, packing: Packing, *, name: str
    ) -> Tensor:
        group = self.begin("attention_region", name, x)
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        queries, keys = head_slices(nh, nkv, self.world)
        qw, kw = queries[0].stop - queries[0].start, keys[0].stop - keys[0].start
        block, parts = self.query_blocks(packing, group)
        owned = min(block, self.per)  # the most rows of a block one rank holds
        world, per, rows = self.world, self.per, min(REGION_ROWS, self.per)
        self.mem.workspace(qw * block * (hd * x.element_size() + 4))  # the fused kernel's output per block
        self.mem.workspace(self.rules.key_copy_bytes(packing.span, kw, hd))
        self.mem.workspace(block * packing.masked_keys * x.element_size())  # a block-causal mask
        every_k, every_v = (self.mem.new((1, world * per, kw, hd), x.dtype) for _ in range(2))
        mine_k, mine_v = (self.mem.new((rows, nkv, hd), x.dtype) for _ in range(2))
        sent = self.mem.new((world * max(rows * kw, owned * qw) * hd,), x.dtype)  # what goes out, or comes back
        came = self.mem.new((world * rows * kw * hd,), x.dtype)  # K or V of the ranks' rows, my heads
        q = self.mem.new((owned, nh * hd), x.dtype)  # my rows' queries, all heads; then their outputs
        heads = self.mem.new((block, qw, hd), x.dtype)  # the block's queries of my heads; then attended
        spliced = self.window_buffers(packing, every_k)  # a window's keys and values: its cache's, my heads
        sub = RegionRows(self, x, spec, layer, packing)
        if self.mem.tracing:
            return x
        for first in range(0, per, rows):  # K and V of my rows, then of every row for my heads
            n = min(rows, per - first)
            sub.keys_values(first, first + n, mine_k[:n], mine_v[:n])
            for mine, every in ((mine_k, every_k), (mine_v, every_v)):
                out, back = sent[: world * n * kw * hd].view(world, n, kw, hd), came[: world * n * kw * hd]
                for r, s in enumerate(keys):
                    out[r].copy_(mine[:n, s])
                dist.all_to_all_single(back, out.view(-1), group=self.group)
                every[0].view(world, per, kw, hd)[:, first : first + n].copy_(back.view(world, n, kw, hd))
        packing.store_caches(index, every_k, every_v)  # a storing sequence's cache keeps my heads
        for part in parts:  # the one-process query blocks (of each attention call)
            offset, length, start, end = part.offset, part.length, part.start, part.end
            a, b = offset + start, offset + end
            counts = self._owned(a, b)
            n, local = counts[self.rank], max(a - self.start, 0)
            if n:
                sub.queries(local, local + n, q)
            out = sent[: world * n * qw * hd].view(world, n, qw, hd)
            for r, s in enumerate(queries):
                out[r].copy_(q[:n].view(n, nh, hd)[:, s])
            block_q = heads[: b - a]
            dist.all_to_all_single(block_q, out.view(world * n, qw, hd), counts, [n] * world, group=self.group)
            k, v = every_k[:, offset : offset + length], every_v[:, offset : offset + length]
            if (use := packing.window(part.sequence)) is not None:
                k, v = self.spliced(use, index, k, v, spliced, first_block=start == 0)
            part.attend_into(block_q[None], k, v, packing)
            dist.all_to_all_single(out.view(world * n, qw, hd), block_q, [n] * world, counts, group=self.group)
            q[:n].view(n, world, qw * hd).copy_(out.view(world, n, qw * hd).transpose(0, 1))
            if n:
                sub.project_add(local, local + n, q)
        return x

    def row_selector(self, hidden: Tensor, rows: int) -> Callable[[Tensor, Tensor], None]:
        """The LM head's rows gathered from the ranks holding them, as one process reads them
        (every rank reads every row, so each can sample)."""
        width = hidden.shape[-1]
        everyone = self.mem.new((self.world, rows, width), hidden.dtype)  # each rank's copy of the rows it holds
        self.mem.workspace(rows * 8 * 3)  # a chunk's row indices
        flat = hidden.view(-1, width)

        def select(index: Tensor, out: Tensor) -> None:
            if self.mem.tracing:
                return
            n = index.numel()
            mine = everyone[self.rank, :n]
            torch.index_select(flat, 0, (index - self.start).clamp_(0, self.per - 1), out=mine)
            dist.all_gather(list(everyone[:, :n].unbind(0)), mine, group=self.group)
            at_owner = torch.div(index, self.per, rounding_mode="floor") * rows + torch.arange(n, device=index.device)
            torch.index_select(everyone.view(-1, width), 0, at_owner, out=out)

        return select
