"""Ops whose every activation comes from a `Memory`: planned arena views when running, meta tensors when tracing.

Each op first declares itself and the tensors it reads (`memory.op`), then asks for its outputs and
scratch buffers (`memory.new`) and writes them with `out=` or in place. The same code therefore
serves two purposes: traced on the meta device it yields the step's op graph and buffer lifetimes
(`graph/trace.py`); run against an arena it places every activation at its planned offset
(`memory/arena.py`). The arithmetic is the official one, op for op, as in `EagerOps`, so results
are bit-identical; only where results are written differs.

What still allocates outside the arena is declared with `memory.workspace`: the output of the fused
attention kernel (it has no out= form) and MoE routing and expert intermediates (their sizes
depend on the routing, i.e. on values).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from .eager import route_and_run_experts


class Memory(Protocol):
    device: torch.device
    tracing: bool  # True: meta tensors, nothing computed; data-dependent work is skipped

    def op(self, name: str, *reads: Tensor) -> None:
        """An op named `name` starts and reads `reads`."""

    def new(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised buffer written by the current op."""

    def workspace(self, nbytes: int) -> None:
        """The current op's kernel allocates `nbytes` outside the arena, freed when the op ends."""


class PlannedOps:
    """Implements `runtime.ops.Ops` (mask-only: `lm_head_rows` instead of `lm_head`) on a `Memory`."""

    def __init__(self, memory: Memory):
        self.mem = memory

    def embed(self, ids: Tensor, table: Tensor, *, name: str) -> Tensor:
        self.mem.op(name, ids)
        out = self.mem.new((*ids.shape, table.shape[1]), table.dtype)
        torch.index_select(table, 0, ids.reshape(-1), out=out.view(-1, table.shape[1]))
        return out

    def rotary_tables(
        self, length: int, rotary_dim: int, theta: float, dtype: torch.dtype | None, device: torch.device, *, name: str
    ) -> tuple[Tensor, Tensor]:
        self.mem.op(name)
        device = self.mem.device
        inv_freq = 1.0 / (  # rotary_dim / 2 floats: negligible, left to the allocator
            theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.int64).float() / rotary_dim)
        )
        positions = self.mem.new((length,), torch.float32)
        torch.arange(length, out=positions)
        freqs = self.mem.new((length, rotary_dim // 2), torch.float32)
        torch.outer(positions, inv_freq, out=freqs)
        emb = self.mem.new((length, rotary_dim), torch.float32)
        torch.cat((freqs, freqs), dim=-1, out=emb)
        tables = []
        for fn in (torch.cos, torch.sin):
            table = self.mem.new((length, rotary_dim), torch.float32)
            fn(emb, out=table)
            if dtype is not None and dtype != torch.float32:
                cast = self.mem.new((length, rotary_dim), dtype)
                cast.copy_(table)
                table = cast
            tables.append(table)
        return tables[0], tables[1]

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, *, name: str) -> Tensor:
        self.mem.op(name, x)
        xf = self.mem.new(tuple(x.shape), torch.float32)
        xf.copy_(x)
        square = self.mem.new(tuple(x.shape), torch.float32)
        torch.pow(xf, 2, out=square)
        var = self.mem.new((*x.shape[:-1], 1), torch.float32)
        torch.mean(square, -1, keepdim=True, out=var)
        var.add_(eps)
        torch.rsqrt(var, out=var)
        xf.mul_(var)
        out = self.mem.new(tuple(x.shape), x.dtype)
        out.copy_(xf)
        return torch.mul(weight, out, out=out)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, *, name: str) -> Tensor:
        self.mem.op(name, x)
        out = self.mem.new((*x.shape[:-1], weight.shape[0]), x.dtype)
        flat_in, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, weight.shape[0])
        if bias is None:
            torch.mm(flat_in, weight.t(), out=flat_out)
        else:  # one fused addmm, as F.linear does for a contiguous input with bias
            torch.addmm(bias, flat_in, weight.t(), out=flat_out)
        return out

    def rotary(self, x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool, *, name: str) -> Tensor:
        self.mem.op(name, x, cos, sin)
        rd, half = cos.shape[-1], cos.shape[-1] // 2
        part = x[..., :rd]
        work_dtype = torch.float32 if full_precision else x.dtype  # LLaDA rotates in float32
        if full_precision:
            p = self.mem.new((*x.shape[:-1], rd), torch.float32)
            p.copy_(part)
        else:
            p = part
        first = self.mem.new((*x.shape[:-1], rd), work_dtype)
        torch.mul(p, cos, out=first)
        rotated = self.mem.new((*x.shape[:-1], rd), work_dtype)
        torch.neg(p[..., half:], out=rotated[..., :half])
        rotated[..., half:].copy_(p[..., :half])
        rotated.mul_(sin)
        first.add_(rotated)
        out = self.mem.new(tuple(x.shape), x.dtype)
        out[..., :rd].copy_(first)
        if rd < x.shape[-1]:
            out[..., rd:].copy_(x[..., rd:])
        return out

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, name: str) -> Tensor:
        self.mem.op(name, q, k, v)
        b, nh, length, hd = q.shape
        groups = nh // k.shape[1]
        if groups > 1:  # repeat_interleave over heads, written into planned buffers
            k, v = (self._repeat_heads(t, groups) for t in (k, v))
        # The fused kernel has no out= form: its output (and log-sum-exp) are workspace.
        self.mem.workspace(q.numel() * q.element_size() + b * nh * length * 4)
        result = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False)
        out = self.mem.new((b, length, nh * hd), q.dtype)
        out.view(b, length, nh, hd).copy_(result.transpose(1, 2))
        return out

    def _repeat_heads(self, t: Tensor, groups: int) -> Tensor:
        b, nkv, length, hd = t.shape
        out = self.mem.new((b, nkv * groups, length, hd), t.dtype)
        out.view(b, nkv, groups, length, hd).copy_(t.unsqueeze(2).expand(b, nkv, groups, length, hd))
        return out

    def mlp(self, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, *, name: str) -> Tensor:
        self.mem.op(name, x)
        flat = x.reshape(-1, x.shape[-1])
        g = self.mem.new((flat.shape[0], gate.shape[0]), x.dtype)
        torch.mm(flat, gate.t(), out=g)
        F.silu(g, inplace=True)
        u = self.mem.new((flat.shape[0], up.shape[0]), x.dtype)
        torch.mm(flat, up.t(), out=u)
        g.mul_(u)
        out = self.mem.new(tuple(x.shape), x.dtype)
        torch.mm(g, down.t(), out=out.view(-1, down.shape[0]))
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
        self.mem.op(name, x)
        tokens = x.numel() // x.shape[-1]
        # Routing (softmax, top-k) is small; expert intermediates depend on the routing: workspace.
        self.mem.workspace(tokens * router.shape[0] * 4 * 2 + tokens * top_k * 16)
        out = self.mem.new(tuple(x.shape), x.dtype)
        out.zero_()
        if not self.mem.tracing:
            route_and_run_experts(
                x.reshape(-1, x.shape[-1]),
                router,
                expert_bias,
                experts,
                top_k,
                normalize_top_k,
                out.view(-1, x.shape[-1]),
            )
        return out

    def add(self, x: Tensor, y: Tensor, *, name: str) -> Tensor:
        """The residual stream stays in place: x += y."""
        self.mem.op(name, x, y)
        return x.add_(y)

    def lm_head_rows(
        self, hidden: Tensor, weight: Tensor, rows: Tensor, chunk: int, *, name: str
    ) -> Iterator[tuple[slice, Tensor]]:
        """(slice of `rows`, (B, C, V) logits) for hidden rows `rows`, `chunk` rows at a time.

        Both the gathered rows and the logits live in one planned buffer each, reused by every
        chunk: consume a chunk's logits before advancing.
        """
        self.mem.op(name, hidden, rows)
        b, v = hidden.shape[0], weight.shape[0]
        gathered = self.mem.new((b, chunk, hidden.shape[-1]), hidden.dtype)
        logits = self.mem.new((b, chunk, v), hidden.dtype)
        for start in range(0, rows.numel(), chunk):
            part = rows[start : start + chunk]
            n = part.numel()
            h = gathered.view(-1)[: b * n * hidden.shape[-1]].view(b, n, hidden.shape[-1])
            torch.index_select(hidden, 1, part, out=h)
            out = logits.view(-1)[: b * n * v].view(b, n, v)
            torch.matmul(h, weight.t(), out=out)
            yield slice(start, start + n), out
