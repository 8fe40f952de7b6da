"""Sequence parallel eager kernels: each rank of a torch.distributed group holds a shard of the
step's packed tokens; attention runs by heads (Ulysses-style).

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

import torch
import torch.distributed as dist
from torch import Tensor

from ..models.ops import RowHead
from ..models.packing import Packing
from .eager import EagerOps


def shard(tokens: int, rank: int, world: int) -> tuple[int, int]:
    """[start, end) of the packed tokens rank `rank` of `world` holds (the last may be shorter or empty)."""
    per = -(-tokens // world)
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
        self.per = -(-self.tokens // self.world)
        return super().embed(ids[:, self.start : self.end], table, name=name)

    def _padded(self, t: Tensor, tokens: int) -> Tensor:
        if t.shape[1] == tokens:
            return t.contiguous()
        return torch.cat((t, t.new_zeros((1, tokens - t.shape[1], *t.shape[2:]))), dim=1)

    def _exchange(self, parts: list[Tensor]) -> list[Tensor]:
        outs = [torch.empty_like(parts[0]) for _ in range(self.world)]
        dist.all_to_all(outs, [p.contiguous() for p in parts], group=self.group)
        return outs

    def _head_slices(self, q_heads: int, kv_heads: int) -> tuple[list[slice], list[slice]]:
        """Per rank, the query heads it attends with and the kv heads those read (whole groups, or one)."""
        per_rank, group = q_heads // self.world, q_heads // kv_heads
        count = max(1, per_rank // group)
        queries = [slice(r * per_rank, (r + 1) * per_rank) for r in range(self.world)]
        return queries, [slice(r * per_rank // group, r * per_rank // group + count) for r in range(self.world)]

    def _to_heads(self, t: Tensor, heads: list[slice]) -> Tensor:
        """(1, local tokens, h, d) -> (1, T, this rank's heads, d): every token of its heads."""
        t = self._padded(t, self.per)
        return torch.cat(self._exchange([t[:, :, s] for s in heads]), dim=1)[:, : self.tokens]

    def rotary(
        self, x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool, packing: Packing, *, name: str
    ) -> Tensor:
        return self.rotate(x, cos, sin, full_precision, packing.positions(x.device)[self.start : self.end])

    def attention(self, q: Tensor, k: Tensor, v: Tensor, packing: Packing, layer: int, *, name: str) -> Tensor:
        if packing.caches:
            raise ValueError("sequence parallel steps do not take block caches yet (Fast-dLLM's cache)")
        queries, keys = self._head_slices(q.shape[2], k.shape[2])
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
