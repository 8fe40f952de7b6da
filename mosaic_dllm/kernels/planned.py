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
chunks, rotary over position chunks, attention over query blocks (against all keys and values; the
blocks the device profile says keep the fused kernel's per-row arithmetic: `attention.py`), the
dense FFN (fused
with its norm and residual add) and MoE over token chunks, the attention norm fused with the q/k/v
projections and the output projection fused with its residual add over token chunks; their scratch
buffers shrink to one chunk. Rotary rotates q and k in place and attention writes each query block's
output over that block of q. When the attention group is chunked, the whole attention block runs as
one region (`attention_region`): K and V of every token first, then per query block its norm, q,
rotary (the block's own table rows), attention, output projection and residual add; so a layer at
its most chunked holds the residual stream, K and V and one block's buffers: the exact floor.

A step's sequences are packed along the tokens (`models/packing.py`): token-local regions chunk
over all T tokens, rotary and attention run each sequence's own chunks. Every GEMM runs in calls
whose row counts the device profile says give a row the same bits (`tiles.py`), so a token's
arithmetic does not depend on how many tokens share its call: chunked or not, alone or packed with
other requests, its results are bit-identical.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from ..device import GemmRule
from ..models.groups import GROUP_OF_METHOD, Chunks, OpGroup, group_spans
from ..models.ops import RowHead
from ..models.packing import Packing
from ..models.quantized import QuantizedWeight
from ..models.spec import MoESpec
from .attention import AttentionOps
from .eager import route_and_run_experts
from .memory import Memory
from .tiles import fresh_swiglu, swiglu_workspace, tile_workspace, tiled_linear, tiled_mm, tiled_swiglu


class PlannedOps(AttentionOps):
    """Implements `models.ops.Ops` on a `Memory`; each method runs in the chunks of its op group."""

    def __init__(self, memory: Memory, chunks: Chunks | None = None):
        self.mem, self.chunks, self.rules = memory, chunks or Chunks(), memory.rules
        self._positions_of: tuple[Packing, Tensor] | None = None  # the step's token positions

    def begin(self, method: str, name: str, *reads: Tensor) -> OpGroup:
        """Declare an op of `method`'s group; returns the group."""
        group = self.rules.group(GROUP_OF_METHOD[method].name)
        self.mem.op(name, group.name, *reads)
        return group

    def chunked(self, method: str) -> bool:
        return getattr(self.chunks, GROUP_OF_METHOD[method].name) > 1

    def spans(self, total: int, group: OpGroup) -> list[tuple[int, int]]:
        """The chunks of `total` rows for `group`; a trace needs only the size of the first (every
        buffer is sized by it), which the tracing memory gives."""
        pieces = getattr(self.chunks, group.name)
        if self.mem.tracing:
            return [(0, self.mem.chunk_size((total,), group, pieces))]
        return group_spans(total, pieces, group)

    def sequence_spans(self, packing: Packing, group: OpGroup) -> tuple[int, list[tuple[int, int, int, int]]]:
        """(the largest chunk, [(sequence offset, sequence length, chunk start, chunk end)]): each
        sequence's own chunks for a per-sequence group; a trace runs only the first."""
        pieces = getattr(self.chunks, group.name)
        if self.mem.tracing:
            size = self.mem.chunk_size(packing.lengths, group, pieces)
            return size, [(0, packing.lengths[0], 0, size)]
        parts = [(o, n, s, e) for o, n in packing.sequences() for s, e in group_spans(n, pieces, group)]
        return max(e - s for _, _, s, e in parts), parts

    def gemm_workspace(self, x: Tensor, *weights: Tensor) -> None:
        """Declare the padded tile a GEMM on fewer rows than a tile allocates (one at a time)."""
        self.mem.workspace(max(tile_workspace(x, w, self.gemm_rule(w)) for w in weights))

    def gemm_rule(self, weight: Tensor | QuantizedWeight, dtype: torch.dtype | None = None) -> GemmRule:
        """The exact calls of a GEMM by `weight`, in the compute dtype or `dtype` (LLaDA2.x's
        float32 router)."""
        return self.rules.gemm(weight.shape[1], weight.shape[0], getattr(weight, "scheme", None), dtype)

    def _swiglu(self, gate: Tensor | QuantizedWeight) -> GemmRule:
        return self.rules.swiglu(gate.shape[1], gate.shape[0], getattr(gate, "scheme", None))

    def embed(self, ids: Tensor, table: Tensor, *, name: str) -> Tensor:
        self.begin("embed", name, ids)
        out = self.mem.new((*ids.shape, table.shape[1]), table.dtype)
        if isinstance(table, QuantizedWeight):  # int8 rows: the gathered codes and scales are workspace
            self.mem.workspace(table.rows_workspace(ids.numel()))
            if not self.mem.tracing:
                table.rows(ids, out=out)
            return out
        torch.index_select(table, 0, ids.reshape(-1), out=out.view(-1, table.shape[1]))
        return out

    def rotary_tables(
        self, length: int, rotary_dim: int, theta: float, dtype: torch.dtype | None, device: torch.device, *, name: str
    ) -> tuple[Tensor, Tensor]:
        self.begin("rotary_tables", name)
        if self.attention_in_query_blocks():  # each query block builds its own rows: no full table
            empty = torch.empty((0, rotary_dim), dtype=dtype or torch.float32, device=self.mem.device)
            return empty, empty
        tables = self.table_buffers(length, rotary_dim, dtype)
        torch.arange(length, out=tables[0])
        return self.fill_tables(tables, length, theta)

    def table_buffers(self, rows: int, rotary_dim: int, dtype: torch.dtype | None) -> list[Tensor]:
        """positions, freqs, emb, cos, sin (and their casts to `dtype`) for `rows` table rows."""
        f32 = torch.float32
        bufs = [self.mem.new((rows,), f32), self.mem.new((rows, rotary_dim // 2), f32)]
        bufs.append(self.mem.new((rows, rotary_dim), f32))
        for _ in range(2):
            bufs.append(self.mem.new((rows, rotary_dim), f32))
            if dtype is not None and dtype != f32:
                bufs.append(self.mem.new((rows, rotary_dim), dtype))
        return bufs

    def fill_tables(self, bufs: list[Tensor], n: int, theta: float) -> tuple[Tensor, Tensor]:
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

    def norm_scratch(self, rows: int, width: int) -> tuple[Tensor, Tensor, Tensor]:
        f32 = torch.float32
        return self.mem.new((rows, width), f32), self.mem.new((rows, width), f32), self.mem.new((rows, 1), f32)

    @staticmethod
    def norm_rows(rows: Tensor, weight: Tensor, eps: float, scratch: tuple[Tensor, ...], out: Tensor) -> None:
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

    def project(self, x: Tensor, weight: Tensor, bias: Tensor | None, out: Tensor) -> None:
        """(n, in) rows -> (n, out) rows, as F.linear computes them, in the calls the device keeps exact."""
        tiled_mm(x, weight, bias, out, self.gemm_rule(weight))

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, *, name: str, overwrite: bool = False) -> Tensor:
        group = self.begin("rms_norm", name, x)
        width = x.shape[-1]
        rows = x.reshape(-1, width)
        parts = self.spans(rows.shape[0], group)
        scratch = self.norm_scratch(parts[0][1] - parts[0][0], width)
        out = x if overwrite and x.is_contiguous() else self.mem.new(tuple(x.shape), x.dtype)
        flat_out = out.view(-1, width)
        for start, end in parts:
            self.norm_rows(rows[start:end], weight, eps, scratch, flat_out[start:end])
        return out

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, *, name: str) -> Tensor:
        self.begin("linear", name, x)
        self.gemm_workspace(x, weight)
        out = self.mem.new((*x.shape[:-1], weight.shape[0]), x.dtype)
        self.project(x.reshape(-1, x.shape[-1]), weight, bias, out.view(-1, weight.shape[0]))
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
        group = self.begin(method, "+".join(names), x)
        rows = x.view(-1, x.shape[-1])
        parts = self.spans(rows.shape[0], group)
        size = parts[0][1] - parts[0][0]
        return rows, parts, self.norm_scratch(size, rows.shape[1]), self.mem.new((size, rows.shape[1]), x.dtype)

    def norm_linears(
        self,
        x: Tensor,
        norm_weight: Tensor,
        eps: float,
        linears: list[tuple[Tensor, Tensor | None]],
        *,
        names: tuple[str, ...],
    ) -> list[Tensor]:
        if not self.chunked("norm_linears"):
            h = self.rms_norm(x, norm_weight, eps, name=names[0])
            return [self.linear(h, w, b, name=n) for (w, b), n in zip(linears, names[1:], strict=True)]
        rows, parts, scratch, h_buf = self._normed_region("norm_linears", x, names)
        self.gemm_workspace(x, *(w for w, _ in linears))
        outs = [self.mem.new((*x.shape[:-1], w.shape[0]), x.dtype) for w, _ in linears]
        for start, end in parts:
            h = h_buf[: end - start]
            self.norm_rows(rows[start:end], norm_weight, eps, scratch, h)
            for (w, b), out in zip(linears, outs, strict=True):
                self.project(h, w, b, out.view(-1, w.shape[0])[start:end])
        return outs

    def linear_add(
        self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, *, names: tuple[str, str]
    ) -> Tensor:
        if not self.chunked("linear_add"):
            return self.add(x, self.linear(y, weight, bias, name=names[0]), name=names[1])
        group = self.begin("linear_add", "+".join(names), x, y)
        self.gemm_workspace(y, weight)
        rows, into = y.reshape(-1, y.shape[-1]), x.view(-1, x.shape[-1])
        parts = self.spans(rows.shape[0], group)
        buf = self.mem.new((parts[0][1] - parts[0][0], weight.shape[0]), x.dtype)
        for start, end in parts:
            projected = buf[: end - start]
            self.project(rows[start:end], weight, bias, projected)
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
        if not self.chunked("norm_mlp_add"):
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
            self.norm_rows(rows[start:end], norm_weight, eps, scratch, h)
            self._swiglu_rows(h, gate, up, down, g_buf[:n], u_buf[:n], f)
            rows[start:end].add_(f)
        return x

    def rotary(
        self, x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool, packing: Packing, *, name: str
    ) -> Tensor:
        """x (1, T, nh, hd) rotated in place over chunks of the packed tokens, each token by its
        position in its own sequence (the tables' rows gathered per chunk; the model reads only the
        rotated q and k)."""
        group = self.begin("rotary", name, x, cos, sin)
        tokens, nh = x.shape[1], x.shape[2]
        rd = cos.shape[-1]
        work_dtype = torch.float32 if full_precision else x.dtype  # LLaDA rotates in float32
        parts = self.spans(tokens, group)
        size = parts[0][1] - parts[0][0]
        positions = self.token_positions(packing, x.device)
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
            self.rotate(p, c, s, first_buf[:, :n], rotated_buf[:, :n])
        return x

    @staticmethod
    def rotate(p: Tensor, c: Tensor, s: Tensor, first: Tensor, rotated: Tensor) -> None:
        """p = p * cos + rotate_half(p) * sin in place, via two scratch buffers of p's shape."""
        half = p.shape[-1] // 2
        torch.mul(p, c, out=first)
        rotated[..., :half].copy_(p[..., half:])
        rotated[..., :half].neg_()
        rotated[..., half:].copy_(p[..., :half])
        rotated.mul_(s)
        first.add_(rotated)
        p.copy_(first)

    def token_positions(self, packing: Packing, device: torch.device) -> Tensor:
        """Each packed token's position in its sequence: made once per step (8 bytes a token,
        declared as workspace of every rotary op)."""
        self.mem.workspace(packing.tokens * 8)
        if self.mem.tracing:
            return torch.empty((packing.tokens,), dtype=torch.long, device=device)
        if self._positions_of is None or self._positions_of[0] is not packing:
            self._positions_of = (packing, packing.positions(device))
        return self._positions_of[1]

    def mlp(self, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, *, name: str) -> Tensor:
        group = self.begin("mlp", name, x)
        self.mem.workspace(swiglu_workspace(x, gate, self._swiglu(gate)))
        flat = x.reshape(-1, x.shape[-1])
        parts = self.spans(flat.shape[0], group)
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
        moe: MoESpec,
        *,
        name: str,
    ) -> Tensor:
        group = self.begin("moe", name, x)
        flat = x.reshape(-1, x.shape[-1])
        parts = self.spans(flat.shape[0], group)
        tokens = parts[0][1] - parts[0][0]
        # Routing (scores, top-k) per token chunk, and the expert intermediates, whose sizes depend
        # on the routing: bounded by one expert receiving every token of the chunk (its gathered
        # input, gate, up and output rows, and the weighted output).
        expert_width = experts[0]["gate"].shape[0] if experts else 0
        itemsize, width, top_k = x.element_size(), x.shape[-1], moe.experts_per_token
        routing = tokens * router.shape[0] * 4 * 2 + tokens * top_k * 16
        if moe.score == "sigmoid":  # float32 copies of the rows and the router, three score tables,
            # the group scores, and every slot's float32 output with their sum
            float_rows = torch.empty((0,), dtype=torch.float32, device="meta")
            routing += (tokens + router.shape[0]) * width * 4 + tokens * router.shape[0] * 4 * 2
            routing += tokens * moe.groups * 4 * 4 + tokens * (top_k + 1) * width * 4
            self.mem.workspace(tile_workspace(float_rows, router, self.gemm_rule(router, torch.float32)))
        else:
            self.gemm_workspace(x, router)
        self.mem.workspace(routing + tokens * (3 * width + 2 * expert_width) * itemsize)
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
                    moe,
                    flat_out[start:end],
                    lambda rows, weight: tiled_linear(
                        rows, weight, None, self.gemm_rule(weight, getattr(weight, "dtype", None))
                    ),
                    lambda rows, gate, up, down: fresh_swiglu(rows, gate, up, down, self._swiglu(gate)),
                )
        return out

    def add(self, x: Tensor, y: Tensor, *, name: str) -> Tensor:
        """The residual stream stays in place: x += y."""
        self.begin("add", name, x, y)
        return x.add_(y)

    def lm_head(
        self, hidden: Tensor, weight: Tensor, packing: Packing, batch: int, chunk: int, *, name: str
    ) -> RowHead:
        """Logits of the requested rows only, `chunk` rows of a request at a time. The gathered rows
        and the logits live in one planned buffer each (`batch` x `chunk` rows), reused by every
        chunk of every request: consume a chunk's logits before advancing."""
        self.begin("lm_head", name, hidden)
        rule = self.gemm_rule(weight)  # a request's head reads few rows: the smallest exact call
        self.mem.workspace(tile_workspace(hidden, weight, rule, few_rows=True, rows=batch * chunk))
        width, vocab = hidden.shape[-1], weight.shape[0]
        gathered = self.mem.new((batch * chunk, width), hidden.dtype)
        logits = self.mem.new((batch * chunk, vocab), hidden.dtype)
        select = self.row_selector(hidden, batch * chunk)

        def head(first: int, count: int, rows: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
            if rows is None:
                rows = torch.arange(packing.lengths[first], device=hidden.device)
            starts = packing.offsets[first : first + count]
            for at in range(0, rows.numel(), chunk):
                part = rows[at : at + chunk]
                n = count * part.numel()
                h, out = gathered[:n], logits[:n]
                select(torch.cat([part + start for start in starts]), h)
                tiled_mm(h, weight, None, out, rule, few_rows=True)
                yield part, out.view(count, part.numel(), vocab)

        return head

    def row_selector(self, hidden: Tensor, rows: int) -> Callable[[Tensor, Tensor], None]:
        """How the LM head reads the hidden states of packed rows `index` into `out` (at most `rows`
        at a time): here, rows of `hidden`."""
        flat = hidden.view(-1, hidden.shape[-1])
        return lambda index, out: torch.index_select(flat, 0, index, out=out)
