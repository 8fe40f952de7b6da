"""Ops whose every activation comes from a `Memory`: planned arena views when running, meta tensors when tracing.

Each op first declares itself and the tensors it reads (`memory.op`), then asks for its outputs and
scratch buffers (`memory.new`) and writes them with `out=` or in place. The same code therefore
serves two purposes: traced on the meta device it yields the step's op graph and buffer lifetimes
(`plan/trace.py`); run against an arena it places every activation at its planned offset
(`runtime/mosaic.py`). The arithmetic is the official one, op for op, as in `EagerOps`, so results
are bit-identical; only where results are written differs.

What still allocates outside the arena is declared with `memory.workspace`: the output of the fused
attention kernel (it has no out= form) and MoE routing and expert intermediates (their sizes
depend on the routing, i.e. on values).

Chunking (`models.groups.Chunks`: pieces per group of the groups table): norms run over token
chunks, rotary over position chunks, attention over query blocks (against all keys and values; blocks
of at least 768 queries starting at multiples of 256, which keep the fused kernel's per-row
arithmetic: see `models/groups.py`), the dense FFN (fused
with its norm and residual add) and MoE over token chunks, the attention norm fused with the q/k/v
projections and the output projection fused with its residual add over token chunks; their scratch
buffers shrink to one chunk. Rotary rotates q and k in place and attention writes each query block's
output over that block of q. When the attention group is chunked, the whole attention block runs as
one region (`attention_region`): K and V of every token first, then per query block its norm, q,
rotary (the block's own table rows), attention, output projection and residual add; so a layer at
its most chunked holds the residual stream, K and V and one block's buffers: the exact floor.

A step's sequences are packed along the tokens (`models/packing.py`): token-local regions chunk
over all T tokens, rotary and attention run each sequence's own chunks. Every GEMM runs in tiles
of a fixed row count (`tiles.py`), so a token's arithmetic does not depend on how many tokens share
its call: chunked or not, alone or packed with other requests, its results are bit-identical.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

from ..device import GemmRule, KernelRules
from ..models.groups import GROUP_OF_METHOD, Chunks, OpGroup, group_spans
from ..models.kv_cache import CacheUse
from ..models.ops import RowHead
from ..models.packing import Packing
from ..models.spec import ArchSpec
from .eager import route_and_run_experts
from .tiles import fresh_swiglu, swiglu_workspace, tile_workspace, tiled_linear, tiled_mm, tiled_swiglu

# torch >= 2.5 lets the attention kernel read grouped kv heads directly (bit-identical to repeating
# them on CPU, tested); older builds repeat them into planned buffers as the official code does.
NATIVE_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


# Rows the attention region normalises, projects and rotates at a time (a wide GEMM's row tile: no
# padded tiles); only the attention itself needs a whole query block.
REGION_ROWS = 256


class Memory(Protocol):
    device: torch.device  # where its buffers live (meta when tracing)
    rules: KernelRules  # the device the step runs on, for the step's dtype: call sizes, blocks, workspace
    tracing: bool  # True: meta tensors, nothing computed; data-dependent work is skipped

    def op(self, name: str, group: str, *reads: Tensor) -> None:
        """An op named `name`, of op group `group`, starts and reads `reads`."""

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised buffer written by the current op."""

    def workspace(self, nbytes: int) -> None:
        """The current op's kernel allocates `nbytes` outside the arena, freed when the op ends."""

    def chunk_size(self, totals: tuple[int, ...], group: OpGroup, pieces: int) -> int:
        """Tracing only: rows in the largest chunk when each of `totals` rows (all tokens, or
        each sequence's queries) is split into `pieces` chunks of op group `group`."""


class AllocatorMemory:
    """A `Memory` that takes every buffer from the PyTorch allocator: the same ops, unplanned.

    Used to measure what the arena plan itself is worth (mask-only logits without a global plan).
    """

    tracing = False

    def __init__(self, rules: KernelRules):
        self.rules, self.device = rules, rules.device

    def op(self, name: str, group: str, *reads: Tensor) -> None:
        pass

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return torch.empty(shape, dtype=dtype, device=self.device)

    def workspace(self, nbytes: int) -> None:
        pass


class PlannedOps:
    """Implements `models.ops.Ops` on a `Memory`; each method runs in the chunks of its op group."""

    def __init__(self, memory: Memory, chunks: Chunks | None = None):
        self.mem, self.chunks, self.rules = memory, chunks or Chunks(), memory.rules
        self._positions_of: tuple[Packing, Tensor] | None = None  # the step's token positions

    def _begin(self, method: str, name: str, *reads: Tensor) -> OpGroup:
        """Declare an op of `method`'s group; returns the group."""
        group = self.rules.group(GROUP_OF_METHOD[method].name)
        self.mem.op(name, group.name, *reads)
        return group

    def _chunked(self, method: str) -> bool:
        return getattr(self.chunks, GROUP_OF_METHOD[method].name) > 1

    def _spans(self, total: int, group: OpGroup) -> list[tuple[int, int]]:
        """The chunks of `total` rows for `group`; a trace needs only the size of the first (every
        buffer is sized by it), which the tracing memory gives."""
        pieces = getattr(self.chunks, group.name)
        if self.mem.tracing:
            return [(0, self.mem.chunk_size((total,), group, pieces))]
        return group_spans(total, pieces, group)

    def _sequence_spans(self, packing: Packing, group: OpGroup) -> tuple[int, list[tuple[int, int, int, int]]]:
        """(the largest chunk, [(sequence offset, sequence length, chunk start, chunk end)]): each
        sequence's own chunks for a per-sequence group; a trace runs only the first."""
        pieces = getattr(self.chunks, group.name)
        if self.mem.tracing:
            size = self.mem.chunk_size(packing.lengths, group, pieces)
            return size, [(0, packing.lengths[0], 0, size)]
        parts = [(o, n, s, e) for o, n in packing.sequences() for s, e in group_spans(n, pieces, group)]
        return max(e - s for _, _, s, e in parts), parts

    def _gemm_workspace(self, x: Tensor, *weights: Tensor) -> None:
        """Declare the padded tile a GEMM on fewer rows than a tile allocates (one at a time)."""
        self.mem.workspace(max(tile_workspace(x, w, self._gemm(w)) for w in weights))

    def _gemm(self, weight: Tensor) -> GemmRule:
        return self.rules.gemm(weight.shape[1], weight.shape[0])

    def _swiglu(self, gate: Tensor) -> GemmRule:
        return self.rules.swiglu(gate.shape[1], gate.shape[0])

    def embed(self, ids: Tensor, table: Tensor, *, name: str) -> Tensor:
        self._begin("embed", name, ids)
        out = self.mem.new((*ids.shape, table.shape[1]), table.dtype)
        torch.index_select(table, 0, ids.reshape(-1), out=out.view(-1, table.shape[1]))
        return out

    def rotary_tables(
        self, length: int, rotary_dim: int, theta: float, dtype: torch.dtype | None, device: torch.device, *, name: str
    ) -> tuple[Tensor, Tensor]:
        self._begin("rotary_tables", name)
        if self.attention_in_query_blocks():  # each query block builds its own rows: no full table
            empty = torch.empty((0, rotary_dim), dtype=dtype or torch.float32, device=self.mem.device)
            return empty, empty
        tables = self._table_buffers(length, rotary_dim, dtype)
        torch.arange(length, out=tables[0])
        return self._fill_tables(tables, length, theta)

    def _table_buffers(self, rows: int, rotary_dim: int, dtype: torch.dtype | None) -> list[Tensor]:
        """positions, freqs, emb, cos, sin (and their casts to `dtype`) for `rows` table rows."""
        f32 = torch.float32
        bufs = [self.mem.new((rows,), f32), self.mem.new((rows, rotary_dim // 2), f32)]
        bufs.append(self.mem.new((rows, rotary_dim), f32))
        for _ in range(2):
            bufs.append(self.mem.new((rows, rotary_dim), f32))
            if dtype is not None and dtype != f32:
                bufs.append(self.mem.new((rows, rotary_dim), dtype))
        return bufs

    def _fill_tables(self, bufs: list[Tensor], n: int, theta: float) -> tuple[Tensor, Tensor]:
        """cos and sin of the first `n` float32 positions in bufs[0], element by element as the
        official tables (a row does not depend on which other rows are computed with it)."""
        positions, freqs, emb, *tables = (b[:n] for b in bufs)
        rotary_dim = emb.shape[-1]
        inv_freq = 1.0 / (  # rotary_dim / 2 floats: negligible, left to the allocator
            theta ** (torch.arange(0, rotary_dim, 2, device=self.mem.device, dtype=torch.int64).float() / rotary_dim)
        )
        torch.outer(positions, inv_freq, out=freqs)
        torch.cat((freqs, freqs), dim=-1, out=emb)
        cast = len(tables) == 4
        out = []
        for fn, table in zip((torch.cos, torch.sin), (tables[0], tables[2 if cast else 1]), strict=True):
            fn(emb, out=table)
            if cast:
                target = tables[1] if fn is torch.cos else tables[3]
                target.copy_(table)
                table = target
            out.append(table)
        return out[0], out[1]

    def _norm_scratch(self, rows: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        f32 = torch.float32
        return self.mem.new((rows, width), f32), self.mem.new((rows, width), f32), self.mem.new((rows, 1), f32)

    @staticmethod
    def _norm_rows(rows: Tensor, weight: Tensor, eps: float, scratch: tuple[Tensor, ...], out: Tensor) -> None:
        """RMSNorm of (n, width) `rows` into `out`, statistics in float32 scratch of at least n rows."""
        n = rows.shape[0]
        xf, square, var = (buf[:n] for buf in scratch)
        xf.copy_(rows)
        torch.pow(xf, 2, out=square)
        torch.mean(square, -1, keepdim=True, out=var)
        var.add_(eps)
        torch.rsqrt(var, out=var)
        xf.mul_(var)
        out.copy_(xf)
        torch.mul(weight, out, out=out)

    def _project(self, x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
        """(n, in) rows -> (n, out) rows, as F.linear computes them, in the calls the device keeps exact."""
        tiled_mm(x, weight, bias, out, self._gemm(weight))

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, *, name: str, overwrite: bool = False) -> Tensor:
        group = self._begin("rms_norm", name, x)
        width = x.shape[-1]
        rows = x.reshape(-1, width)
        parts = self._spans(rows.shape[0], group)
        scratch = self._norm_scratch(parts[0][1] - parts[0][0], width)
        out = x if overwrite and x.is_contiguous() else self.mem.new(tuple(x.shape), x.dtype)
        flat_out = out.view(-1, width)
        for start, end in parts:
            self._norm_rows(rows[start:end], weight, eps, scratch, flat_out[start:end])
        return out

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, *, name: str) -> Tensor:
        self._begin("linear", name, x)
        self._gemm_workspace(x, weight)
        out = self.mem.new((*x.shape[:-1], weight.shape[0]), x.dtype)
        self._project(x.reshape(-1, x.shape[-1]), weight, bias, out.view(-1, weight.shape[0]))
        return out

    def _swiglu_rows(self, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, g: Tensor, u: Tensor, out: Tensor):
        """down(silu(gate(x)) * up(x)) for (n, H) rows `x`, intermediates in `g` and `u` (n rows each)."""
        tiled_swiglu(x, gate, up, down, out, self._swiglu(gate), g, u)

    # Token-local regions. Unchunked, they run op by op like the official code; in token chunks they
    # run as one op whose intermediates are one chunk each (the normalised rows, the projection
    # before its residual add, the FFN's intermediates), so none of them exists at full length.
    def _normed_region(self, method: str, x: Tensor, names: tuple[str, ...]):
        """Start a fused region that normalises x chunk by chunk: (rows of x, chunks, norm scratch,
        one chunk of normalised rows)."""
        group = self._begin(method, "+".join(names), x)
        rows = x.view(-1, x.shape[-1])
        parts = self._spans(rows.shape[0], group)
        size = parts[0][1] - parts[0][0]
        return rows, parts, self._norm_scratch(size, rows.shape[1]), self.mem.new((size, rows.shape[1]), x.dtype)

    def norm_linears(
        self,
        x: Tensor,
        norm_weight: Tensor,
        eps: float,
        linears: list[tuple[Tensor, Tensor | None]],
        *,
        names: tuple[str, ...],
    ) -> list[Tensor]:
        if not self._chunked("norm_linears"):
            h = self.rms_norm(x, norm_weight, eps, name=names[0])
            return [self.linear(h, w, b, name=n) for (w, b), n in zip(linears, names[1:], strict=True)]
        rows, parts, scratch, h_buf = self._normed_region("norm_linears", x, names)
        self._gemm_workspace(x, *(w for w, _ in linears))
        outs = [self.mem.new((*x.shape[:-1], w.shape[0]), x.dtype) for w, _ in linears]
        for start, end in parts:
            h = h_buf[: end - start]
            self._norm_rows(rows[start:end], norm_weight, eps, scratch, h)
            for (w, b), out in zip(linears, outs, strict=True):
                self._project(h, w, b, out.view(-1, w.shape[0])[start:end])
        return outs

    def linear_add(
        self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, *, names: tuple[str, str]
    ) -> Tensor:
        if not self._chunked("linear_add"):
            return self.add(x, self.linear(y, weight, bias, name=names[0]), name=names[1])
        group = self._begin("linear_add", "+".join(names), x, y)
        self._gemm_workspace(y, weight)
        rows, into = y.reshape(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        parts = self._spans(rows.shape[0], group)
        buf = self.mem.new((parts[0][1] - parts[0][0], weight.shape[0]), x.dtype)
        for start, end in parts:
            projected = buf[: end - start]
            self._project(rows[start:end], weight, bias, projected)
            into[start:end].add_(projected)
        return x

    def norm_mlp_add(
        self,
        x: Tensor,
        norm_weight: Tensor,
        eps: float,
        gate: Tensor,
        up: Tensor,
        down: Tensor,
        *,
        names: tuple[str, ...],
    ) -> Tensor:
        if not self._chunked("norm_mlp_add"):
            h = self.rms_norm(x, norm_weight, eps, name=names[0])
            return self.add(x, self.mlp(h, gate, up, down, name=names[1]), name=names[2])
        rows, parts, scratch, h_buf = self._normed_region("norm_mlp_add", x, names)
        self.mem.workspace(swiglu_workspace(x, gate, self._swiglu(gate)))
        size = h_buf.shape[0]
        g_buf = self.mem.new((size, gate.shape[0]), x.dtype)
        u_buf = self.mem.new((size, up.shape[0]), x.dtype)
        f_buf = self.mem.new(tuple(h_buf.shape), x.dtype)
        for start, end in parts:  # a chunk's rows are normalised before its own residual add
            n = end - start
            h, f = h_buf[:n], f_buf[:n]
            self._norm_rows(rows[start:end], norm_weight, eps, scratch, h)
            self._swiglu_rows(h, gate, up, down, g_buf[:n], u_buf[:n], f)
            rows[start:end].add_(f)
        return x

    def rotary(
        self, x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool, packing: Packing, *, name: str
    ) -> Tensor:
        """x (1, T, nh, hd) rotated in place over chunks of the packed tokens, each token by its
        position in its own sequence (the tables' rows gathered per chunk; the model reads only the
        rotated q and k)."""
        group = self._begin("rotary", name, x, cos, sin)
        tokens, nh = x.shape[1], x.shape[2]
        rd = cos.shape[-1]
        work_dtype = torch.float32 if full_precision else x.dtype  # LLaDA rotates in float32
        parts = self._spans(tokens, group)
        size = parts[0][1] - parts[0][0]
        positions = self._positions(packing, x.device)
        # In float32 the bf16 inputs are widened inside each op (exactly, as .float() would), so no
        # float32 copy of x is needed.
        first_buf = self.mem.new((1, size, nh, rd), work_dtype)
        rotated_buf = self.mem.new((1, size, nh, rd), work_dtype)
        tables_buf = [self.mem.new((size, 1, rd), cos.dtype) for _ in range(2)]
        for start, end in parts:  # a chunk is read whole before it is overwritten
            n = end - start
            p = x[:, start:end, :, :rd]
            c, s = (buf[:n] for buf in tables_buf)
            torch.index_select(cos, 0, positions[start:end], out=c.view(n, rd))
            torch.index_select(sin, 0, positions[start:end], out=s.view(n, rd))
            self._rotate(p, c, s, first_buf[:, :n], rotated_buf[:, :n])
        return x

    @staticmethod
    def _rotate(p: Tensor, c: Tensor, s: Tensor, first: Tensor, rotated: Tensor) -> None:
        """p = p * cos + rotate_half(p) * sin in place, via two scratch buffers of p's shape."""
        half = p.shape[-1] // 2
        torch.mul(p, c, out=first)
        rotated[..., :half].copy_(p[..., half:])
        rotated[..., :half].neg_()
        rotated[..., half:].copy_(p[..., :half])
        rotated.mul_(s)
        first.add_(rotated)
        p.copy_(first)

    def _positions(self, packing: Packing, device: torch.device) -> Tensor:
        """Each packed token's position in its sequence: made once per step (8 bytes a token,
        declared as workspace of every rotary op)."""
        self.mem.workspace(packing.tokens * 8)
        if self.mem.tracing:
            return torch.empty((packing.tokens,), dtype=torch.long, device=device)
        if self._positions_of is None or self._positions_of[0] is not packing:
            self._positions_of = (packing, packing.positions(device))
        return self._positions_of[1]

    def attention(self, q: Tensor, k: Tensor, v: Tensor, packing: Packing, layer: int, *, name: str) -> Tensor:
        """Each sequence's query blocks against its own keys and values; a block's output overwrites
        that block of q (token-major, so the output is already (1, T, nh * hd)), read by it alone.
        A refreshing sequence stores its K and V in its cache (outside the arena, counted by the
        plan); a window's keys and values are spliced from its cache into two planned buffers,
        sized for the longest window's canvas and reused sequence after sequence."""
        group = self._begin("attention", name, q, k, v)
        _, tokens, nh, hd = q.shape
        groups = nh // k.shape[2]
        spliced = self._window_buffers(packing, k)
        if not self.mem.tracing:
            packing.store_caches(layer, k, v)
        gqa, own = {}, (k, v)  # `own`: the fresh K and V with their kv heads
        repeat = groups > 1 and not NATIVE_GQA
        if groups > 1 and NATIVE_GQA:  # the kernel indexes kv heads itself: no repeated copies
            gqa = {"enable_gqa": True}
        elif repeat:  # repeat_interleave over heads, written into planned buffers
            k, v = (self._repeat_heads(t, groups) for t in (k, v))
            if spliced is not None:
                spliced_heads = [self.mem.new((1, spliced[0].shape[1], nh, hd), k.dtype) for _ in range(2)]
        block, parts = self._sequence_spans(packing, group)
        # The fused kernel has no out= form: its output (and log-sum-exp) per query block are
        # workspace, and so is its packed copy of the keys and values.
        self.mem.workspace(nh * block * (hd * q.element_size() + 4))
        self.mem.workspace(self.rules.key_copy_bytes(packing.span, k.shape[2], hd))
        sequence_of = {o: i for i, (o, _) in enumerate(packing.sequences())}
        for offset, length, start, end in parts:
            keys, values = (t[:, offset : offset + length].transpose(1, 2) for t in (k, v))
            use = packing.window(sequence_of[offset]) if not self.mem.tracing else None
            if use is not None:
                n = use.length
                fresh = [t[:, offset : offset + length] for t in own]
                window = self._spliced(use, layer, *fresh, spliced, first_block=start == 0)
                if repeat and start == 0:
                    for src, dst in zip(window, spliced_heads, strict=True):
                        shape = (1, n, src.shape[2], groups, hd)
                        dst[:, :n].view(shape).copy_(src.unsqueeze(3).expand(shape))
                keys, values = (t[:, :n].transpose(1, 2) for t in (spliced_heads if repeat else window))
            queries = q[:, offset + start : offset + end]
            result = F.scaled_dot_product_attention(
                queries.transpose(1, 2), keys, values, attn_mask=None, dropout_p=0.0, is_causal=False, **gqa
            )
            queries.copy_(result.transpose(1, 2))
            del result
        return q.view(1, tokens, nh * hd)

    def attention_in_query_blocks(self) -> bool:
        return self._chunked("attention_region") or self._chunked("attention_recompute")

    def attention_region(
        self, x: Tensor, spec: ArchSpec, layer: dict[str, Tensor], index: int, packing: Packing, *, name: str
    ) -> Tensor:
        """The attention block in each sequence's query blocks (the attention group's chunks, which
        keep the fused kernel's per-row arithmetic). First K and V of every token into two buffers
        that live through the region; then per query block its q, attention against its
        sequence's K and V (or its cache's, spliced), output projection and residual add. Norms,
        projections and rotary run `REGION_ROWS` rows at a time (rotary with those rows' own table
        rows); only the attention needs a whole query block (its q). The op-by-op path's
        arithmetic on the same rows, so the same bits; the floor is the residual stream plus K, V.
        With the recompute group chunked, `_attention_recompute` runs instead."""
        if self._chunked("attention_recompute"):
            return self._attention_recompute(x, spec, layer, index, packing, name=name)
        group = self._begin("attention_region", name, x)
        _, tokens, _ = x.shape
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        groups = nh // nkv
        repeat = groups > 1 and not NATIVE_GQA
        block, parts = self._sequence_spans(packing, group)
        self.mem.workspace(nh * block * (hd * x.element_size() + 4))  # the fused kernel's output per block
        self.mem.workspace(self.rules.key_copy_bytes(packing.span, nh if repeat else nkv, hd))
        if repeat:  # torch < 2.5: one sequence's keys and values repeated over the heads at a time
            self.mem.workspace(2 * packing.span * nh * hd * x.element_size())
        keys, values = (self.mem.new((1, tokens, nkv, hd), x.dtype) for _ in range(2))
        spliced = self._window_buffers(packing, keys)
        q = self.mem.new((block, nh * hd), x.dtype)  # a query block's queries, then its attention output
        sub = _RegionRows(self, x, spec, layer, packing)
        if self.mem.tracing:
            return x
        for offset, _, start, end in parts:  # K and V of every token
            at = slice(offset + start, offset + end)
            sub.keys_values(at.start, at.stop, keys[0, at], values[0, at])
        packing.store_caches(index, keys, values)
        sequence_of = {o: i for i, (o, _) in enumerate(packing.sequences())}
        for offset, length, start, end in parts:  # query blocks
            m = end - start
            k, v = keys[:, offset : offset + length], values[:, offset : offset + length]
            use = packing.window(sequence_of[offset])
            if use is not None:
                k, v = self._spliced(use, index, k, v, spliced, first_block=start == 0)
            if repeat:
                k, v = (t.repeat_interleave(groups, dim=2) for t in (k, v))  # torch < 2.5 only
            sub.queries(offset + start, offset + end, q)
            gqa = {"enable_gqa": True} if groups > 1 and not repeat else {}
            result = F.scaled_dot_product_attention(
                q[:m].view(1, m, nh, hd).transpose(1, 2),
                k.transpose(1, 2),
                v.transpose(1, 2),
                attn_mask=None,
                dropout_p=0.0,
                is_causal=False,
                **gqa,
            )
            q[:m].view(1, m, nh, hd).copy_(result.transpose(1, 2))
            del result
            sub.project_add(offset + start, offset + end, q)
        return x

    def _attention_recompute(
        self, x: Tensor, spec: ArchSpec, layer: dict[str, Tensor], index: int, packing: Packing, *, name: str
    ) -> Tensor:
        """The attention block below the exact floor: no full-length K or V. Each query block of a
        sequence streams over the same blocks as key chunks, computing each chunk's K and V again
        from the residual stream (the exact region's arithmetic, so the same K and V bits), runs the
        fused kernel on it and merges the chunks' outputs by their log-sum-exps in float32. The
        residual stream cannot take a block's output before every block has read its keys, so the
        outputs wait in one full-length buffer and are projected and added at the end: the floor
        is the residual stream plus that buffer (for MHA, 2/3 of the exact floor; grouped-query
        models, whose K and V are narrower, gain nothing and the search does not pick it). Only
        the softmax merge differs from the exact kernel: results within a tolerance, not bits."""
        if packing.caches:  # the search never picks it with caches: they hold every layer's K and V
            raise ValueError("recomputing keys and values cannot serve block caches")
        group = self._begin("attention_recompute", name, x)
        _, tokens, _ = x.shape
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        groups = nh // nkv
        kv_heads = nkv if NATIVE_GQA else nh  # torch < 2.5: each key chunk repeated over the heads
        block, parts = self._sequence_spans(packing, group)
        item = x.element_size()
        # Per key chunk, the kernel's output, log-sum-exp and packed keys and values, and the
        # merge's float32 copy of that output; before torch 2.5 the repeated key chunk.
        self.mem.workspace(nh * block * (hd * item + 4) + nh * block * hd * 4)
        self.mem.workspace(self.rules.key_copy_bytes(block, kv_heads, hd))
        if kv_heads != nkv:
            self.mem.workspace(2 * block * nh * hd * item)
        self.mem.workspace(chunk_attention_workspace(nh, block, block, hd, self.rules.device))
        outputs = self.mem.new((tokens, nh * hd), x.dtype)  # every query block's attention output
        keys, values = (self.mem.new((block, nkv, hd), x.dtype) for _ in range(2))
        q = self.mem.new((block, nh * hd), x.dtype)
        merged = self.mem.new((nh, block, hd), torch.float32)  # the output so far, normalised
        total, scale = (self.mem.new((nh, block), torch.float32) for _ in range(2))  # log-sum-exps so far
        sub = _RegionRows(self, x, spec, layer, packing)
        if self.mem.tracing:
            return x
        blocks: dict[int, list[tuple[int, int]]] = {}
        for offset, _, start, end in parts:
            blocks.setdefault(offset, []).append((start, end))
        predicting = is_fake(x)
        for offset, spans in blocks.items():
            # A prediction (fake tensors, no values) runs the largest query block against the two
            # largest key chunks: every other iteration allocates the same, and the loop is quadratic.
            largest = sorted(spans, key=lambda span: span[0] - span[1])[:2] if predicting else spans
            for start, end in largest[:1] if predicting else spans:  # query blocks
                m = end - start
                sub.queries(offset + start, offset + end, q)
                queries = q[:m].view(1, m, nh, hd).transpose(1, 2)
                acc, lse, factor = merged[:, :m], total[:, :m], scale[:, :m]
                for first, (k_start, k_end) in enumerate(largest):  # key chunks, computed again
                    n = k_end - k_start
                    k, v = keys[:n], values[:n]
                    sub.keys_values(offset + k_start, offset + k_end, k, v)
                    if kv_heads != nkv:
                        k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
                    out, chunk_lse = chunk_attention(queries, k[None].transpose(1, 2), v[None].transpose(1, 2))
                    out, chunk_lse = out[0], chunk_lse[0]
                    if first == 0:
                        acc.copy_(out)
                        lse.copy_(chunk_lse)
                        continue
                    torch.logaddexp(lse, chunk_lse, out=factor)  # the new total
                    lse.sub_(factor).exp_()  # the old part's weight
                    acc.mul_(lse[..., None])
                    chunk_lse.sub_(factor).exp_()  # the chunk's weight
                    acc.add_(out.float().mul_(chunk_lse[..., None]))
                    lse.copy_(factor)
                    del out, chunk_lse
                rows = outputs[offset + start : offset + end].view(m, nh, hd)
                rows.copy_(acc.transpose(0, 1))
        sub.project_add(0, tokens, outputs, from_start=True)
        return x

    def _window_buffers(self, packing: Packing, k: Tensor) -> list[Tensor] | None:
        """Two planned (1, canvas, kv heads, hd) buffers for windows' spliced keys and values,
        sized for the longest window's canvas and reused sequence after sequence (None: no window)."""
        canvases = [w.length for i in range(len(packing.lengths)) if (w := packing.window(i))]
        if not canvases:
            return None
        return [self.mem.new((1, max(canvases), *k.shape[2:]), k.dtype) for _ in range(2)]

    @staticmethod
    def _spliced(
        use: CacheUse, layer: int, k: Tensor, v: Tensor, spliced: list[Tensor], first_block: bool
    ) -> tuple[Tensor, Tensor]:
        """A window's keys and values: its cache's with its own fresh (1, n, ...) K and V in place,
        written into `spliced` at the sequence's first query block and read by the others."""
        if first_block:
            use.cache.splice(layer, k[0], v[0], use.start, use.length, (spliced[0][0], spliced[1][0]))
        return spliced[0][:, : use.length], spliced[1][:, : use.length]

    def _repeat_heads(self, t: Tensor, groups: int) -> Tensor:
        """Token-major (1, T, nkv, hd) -> (1, T, nkv * groups, hd), each kv head repeated in place."""
        b, tokens, nkv, hd = t.shape
        out = self.mem.new((b, tokens, nkv * groups, hd), t.dtype)
        out.view(b, tokens, nkv, groups, hd).copy_(t.unsqueeze(3).expand(b, tokens, nkv, groups, hd))
        return out

    def mlp(self, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, *, name: str) -> Tensor:
        group = self._begin("mlp", name, x)
        self.mem.workspace(swiglu_workspace(x, gate, self._swiglu(gate)))
        flat = x.reshape(-1, x.shape[-1])
        parts = self._spans(flat.shape[0], group)
        size = parts[0][1] - parts[0][0]
        g_buf = self.mem.new((size, gate.shape[0]), x.dtype)
        u_buf = self.mem.new((size, up.shape[0]), x.dtype)
        out = self.mem.new(tuple(x.shape), x.dtype)
        flat_out = out.view(-1, down.shape[0])
        for start, end in parts:
            n = end - start
            self._swiglu_rows(flat[start:end], gate, up, down, g_buf[:n], u_buf[:n], flat_out[start:end])
        return out

    def moe(
        self,
        x: Tensor,
        router: Tensor,
        expert_bias: Tensor | None,
        experts: list[dict[str, Tensor]],
        top_k: int,
        normalize_top_k: bool,
        *,
        name: str,
    ) -> Tensor:
        group = self._begin("moe", name, x)
        flat = x.reshape(-1, x.shape[-1])
        parts = self._spans(flat.shape[0], group)
        tokens = parts[0][1] - parts[0][0]
        # Routing (softmax, top-k) per token chunk, and the expert intermediates, whose sizes depend
        # on the routing: bounded by one expert receiving every token of the chunk (its gathered
        # input, gate, up and output rows, and the weighted output).
        expert_width = experts[0]["gate"].shape[0] if experts else 0
        itemsize = x.element_size()
        routing = tokens * router.shape[0] * 4 * 2 + tokens * top_k * 16
        self.mem.workspace(routing + tokens * (3 * x.shape[-1] + 2 * expert_width) * itemsize)
        self._gemm_workspace(x, router)
        if experts:
            self.mem.workspace(swiglu_workspace(x, experts[0]["gate"], self._swiglu(experts[0]["gate"])))
        out = self.mem.new(tuple(x.shape), x.dtype)
        out.zero_()
        if not self.mem.tracing:
            flat_out = out.view(-1, x.shape[-1])
            for start, end in parts:  # each token's experts are summed in the same order
                route_and_run_experts(
                    flat[start:end],
                    router,
                    expert_bias,
                    experts,
                    top_k,
                    normalize_top_k,
                    flat_out[start:end],
                    lambda rows, weight: tiled_linear(rows, weight, None, self._gemm(weight)),
                    lambda rows, gate, up, down: fresh_swiglu(rows, gate, up, down, self._swiglu(gate)),
                )
        return out

    def add(self, x: Tensor, y: Tensor, *, name: str) -> Tensor:
        """The residual stream stays in place: x += y."""
        self._begin("add", name, x, y)
        return x.add_(y)

    def lm_head(
        self, hidden: Tensor, weight: Tensor, packing: Packing, batch: int, chunk: int, *, name: str
    ) -> RowHead:
        """Logits of the requested rows only, `chunk` rows of a request at a time. The gathered rows
        and the logits live in one planned buffer each (`batch` x `chunk` rows), reused by every
        chunk of every request: consume a chunk's logits before advancing."""
        self._begin("lm_head", name, hidden)
        rule = self._gemm(weight)  # a request's head reads few rows: the smallest exact call
        self.mem.workspace(tile_workspace(hidden, weight, rule, few_rows=True))
        width, vocab = hidden.shape[-1], weight.shape[0]
        gathered = self.mem.new((batch * chunk, width), hidden.dtype)
        logits = self.mem.new((batch * chunk, vocab), hidden.dtype)
        flat = hidden.view(-1, width)

        def head(first: int, count: int, rows: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
            if rows is None:
                rows = torch.arange(packing.lengths[first], device=hidden.device)
            starts = packing.offsets[first : first + count]
            for at in range(0, rows.numel(), chunk):
                part = rows[at : at + chunk]
                n = count * part.numel()
                h, out = gathered[:n], logits[:n]
                torch.index_select(flat, 0, torch.cat([part + start for start in starts]), out=h)
                tiled_mm(h, weight, None, out, rule, few_rows=True)
                yield part, out.view(count, part.numel(), vocab)

        return head


def chunk_attention(q: Tensor, k: Tensor, v: Tensor, fused: bool | None = None) -> tuple[Tensor, Tensor]:
    """(output, log-sum-exp per query and head) of queries (1, nh, m, hd) against one chunk of
    keys and values (1, nkv, n, hd): the fused CPU kernel (`fused`, default on CPU), else float32
    maths (what it allocates: `chunk_attention_workspace`)."""
    if q.device.type == "cpu" if fused is None else fused:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
        return out, lse
    groups = q.shape[1] // k.shape[1]
    k, v = (t.repeat_interleave(groups, dim=1).float() for t in (k, v))
    scores = torch.matmul(q.float(), k.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(scores.sub_(lse[..., None]).exp_(), v).to(q.dtype), lse


def chunk_attention_workspace(heads: int, queries: int, keys: int, head_dim: int, runs_on: torch.device) -> int:
    """Bytes `chunk_attention`'s float32 path allocates beyond its output: the repeated float32 keys
    and values, the float32 queries, the scores and their log-sum-exp (none for the fused kernel,
    whose output and K/V copy the caller declares)."""
    if runs_on.type == "cpu":
        return 0
    return 4 * (2 * keys * heads * head_dim + queries * heads * head_dim + heads * queries * (keys + 1))


class _RegionRows:
    """The attention regions' row work, `REGION_ROWS` rows at a time in planned scratch: the
    attention norm, K/V or q projections with head norms and rotary (tables built for the rows'
    own positions), the output projection and residual add. The same arithmetic as the op-by-op
    path, row by row."""

    def __init__(self, ops: PlannedOps, x: Tensor, spec: ArchSpec, layer: dict[str, Tensor], packing: Packing):
        mem, width, nh = ops.mem, x.shape[-1], spec.num_heads
        self.ops, self.spec, self.layer, self.rows = ops, spec, layer, x.view(-1, width)
        self.bias = {p: layer.get(f"{p}_bias") for p in ("q", "k", "v", "o")}
        ops._gemm_workspace(x, layer["q"], layer["k"], layer["v"])
        mem.workspace(tile_workspace(x, layer["o"], ops._gemm(layer["o"])))
        sub, rd = REGION_ROWS, spec.rotary_dim
        self.scratch = ops._norm_scratch(sub, width)
        self.h = mem.new((sub, width), x.dtype)
        self.projected = mem.new((sub, width), x.dtype)
        self.heads_scratch = ops._norm_scratch(sub * nh, spec.head_dim) if spec.qk_norm else None
        work = torch.float32 if spec.rope_full_precision else x.dtype
        self.first, self.rotated = (mem.new((sub, nh, rd), work) for _ in range(2))
        self.tables = ops._table_buffers(sub, rd, None if spec.rope_full_precision else x.dtype)
        self.positions = ops._positions(packing, x.device)

    def _pieces(self, first: int, last: int) -> list[slice]:
        return [slice(a, min(a + REGION_ROWS, last)) for a in range(first, last, REGION_ROWS)]

    def _normed(self, at: slice) -> Tensor:
        n = at.stop - at.start
        self.ops._norm_rows(self.rows[at], self.layer["attn_norm"], self.spec.rms_norm_eps, self.scratch, self.h[:n])
        return self.h[:n]

    def _heads(self, weight: str, out: Tensor, at: slice) -> None:
        """out (n, heads * hd) = rotary(head norm(h @ W.T + b)) at the rows' positions."""
        spec, n = self.spec, at.stop - at.start
        hd, rd = spec.head_dim, spec.rotary_dim
        count = out.shape[-1] // hd
        self.ops._project(self.h[:n], self.layer[weight], self.bias[weight], out)
        if self.heads_scratch is not None:
            flat = out.view(n * count, hd)
            self.ops._norm_rows(flat, self.layer[f"{weight}_norm"], spec.rms_norm_eps, self.heads_scratch, flat)
        self.tables[0][:n].copy_(self.positions[at])
        cos, sin = self.ops._fill_tables(self.tables, n, spec.rope_theta)
        part = out.view(n, count, hd)[..., :rd]
        self.ops._rotate(part, cos.unsqueeze(1), sin.unsqueeze(1), self.first[:n, :count], self.rotated[:n, :count])

    def keys_values(self, first: int, last: int, keys: Tensor, values: Tensor) -> None:
        """K and V of packed rows [first, last) into keys, values ((last - first, nkv, hd) each)."""
        width = self.spec.num_kv_heads * self.spec.head_dim
        for at in self._pieces(first, last):
            rows = slice(at.start - first, at.stop - first)
            self._normed(at)
            self._heads("k", keys[rows].view(-1, width), at)
            h = self.h[: at.stop - at.start]
            self.ops._project(h, self.layer["v"], self.bias["v"], values[rows].view(-1, width))

    def queries(self, first: int, last: int, q: Tensor) -> None:
        """q of packed rows [first, last) into q's first rows."""
        for at in self._pieces(first, last):
            self._normed(at)
            self._heads("q", q[at.start - first : at.stop - first], at)

    def project_add(self, first: int, last: int, attended: Tensor, from_start: bool = False) -> None:
        """The residual stream's rows [first, last) += o(attended rows): attended's first rows, or
        (from_start) its rows [first, last)."""
        for at in self._pieces(first, last):
            n = at.stop - at.start
            row = at.start if from_start else at.start - first
            self.ops._project(attended[row : row + n], self.layer["o"], self.bias["o"], self.projected[:n])
            self.rows[at].add_(self.projected[:n])
