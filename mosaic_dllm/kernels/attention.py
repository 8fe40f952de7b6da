"""The planned attention paths (`PlannedOps` inherits them): op by op over query blocks, the whole
attention block as one region (`attention_region`, the exact floor), and below the floor with keys
and values recomputed per query block (`attention_recompute`, within a tolerance); the region's row
work (`RegionRows`) and the chunked kernel with its log-sum-exp (`chunk_attention`).

Query blocks follow the device profile's attention rule (`device.AttentionRule`: the blocks that
keep the fused kernel's per-row arithmetic); the kernel's output, log-sum-exp and any K/V copy it
makes inside a call are declared as workspace. Grouped kv heads are read by the kernel itself
(`enable_gqa`), never repeated.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..memory.prediction import is_predicting
from ..models.groups import OpGroup, group_spans, largest_chunk
from ..models.kv_cache import CacheUse, block_causal_mask
from ..models.packing import Packing
from ..models.spec import ArchSpec
from .tiles import tile_workspace

# Rows the attention region normalises, projects and rotates at a time (a wide GEMM's row tile: no
# padded tiles); only the attention itself needs a whole query block.
REGION_ROWS = 256


class AttentionOps:
    """`PlannedOps`' attention methods; they use its memory (`mem`), `rules` and row helpers
    (`begin`, `chunked`, `sequence_spans`, `gemm_workspace`, `gemm_rule`, `norm_scratch`,
    `norm_rows`, `project`, `table_buffers`, `fill_tables`, `rotate`, `token_positions`)."""

    def attention(self, q: Tensor, k: Tensor, v: Tensor, packing: Packing, layer: int, *, name: str) -> Tensor:
        """Each sequence's query blocks against its own keys and values; a block's output overwrites
        that block of q (token-major, so the output is already (1, T, nh * hd)), read by it alone.
        A sequence that stores keeps its K and V in its cache (outside the arena, counted by the
        plan); a window's keys and values are spliced from its cache into two planned buffers,
        sized for the longest window's canvas and reused sequence after sequence."""
        group = self.begin("attention", name, q, k, v)
        _, tokens, nh, hd = q.shape
        spliced = self.window_buffers(packing, k)
        if not self.mem.tracing:
            packing.store_caches(layer, k, v)
        block, parts = self.query_blocks(packing, group)
        # The fused kernel has no out= form: its output (and log-sum-exp) per query block are
        # workspace, and so is its packed copy of the keys and values, and a block-causal mask.
        self.mem.workspace(nh * block * (hd * q.element_size() + 4))
        self.mem.workspace(self.rules.key_copy_bytes(packing.span, k.shape[2], hd))
        self.mem.workspace(block * packing.masked_keys * q.element_size())
        for part in parts:
            offset, length, start, end = part.offset, part.length, part.start, part.end
            keys, values = (t[:, offset : offset + length] for t in (k, v))
            use = packing.window(part.sequence) if not self.mem.tracing else None
            if use is not None:
                keys, values = self.spliced(use, layer, keys, values, spliced, first_block=start == 0)
            part.attend_into(q[:, offset + start : offset + end], keys, values, packing)
        return q.view(1, tokens, nh * hd)

    def attention_in_query_blocks(self) -> bool:
        return self.chunked("attention_region") or self.chunked("attention_recompute")

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
        if self.chunked("attention_recompute"):
            return self.attention_recompute(x, spec, layer, index, packing, name=name)
        group = self.begin("attention_region", name, x)
        _, tokens, _ = x.shape
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        block, parts = self.query_blocks(packing, group)
        self.mem.workspace(nh * block * (hd * x.element_size() + 4))  # the fused kernel's output per block
        self.mem.workspace(self.rules.key_copy_bytes(packing.span, nkv, hd))
        self.mem.workspace(block * packing.masked_keys * x.element_size())  # a block-causal mask
        keys, values = (self.mem.new((1, tokens, nkv, hd), x.dtype) for _ in range(2))
        spliced = self.window_buffers(packing, keys)
        q = self.mem.new((block, nh * hd), x.dtype)  # a query block's queries, then its attention output
        sub = RegionRows(self, x, spec, layer, packing)
        if self.mem.tracing:
            return x
        for part in parts:  # K and V of every token
            at = slice(part.offset + part.start, part.offset + part.end)
            sub.keys_values(at.start, at.stop, keys[0, at], values[0, at])
        packing.store_caches(index, keys, values)
        for part in parts:  # query blocks
            offset, length, start, end = part.offset, part.length, part.start, part.end
            m = end - start
            k, v = keys[:, offset : offset + length], values[:, offset : offset + length]
            use = packing.window(part.sequence)
            if use is not None:
                k, v = self.spliced(use, index, k, v, spliced, first_block=start == 0)
            sub.queries(offset + start, offset + end, q)
            part.attend_into(q[:m].view(1, m, nh, hd), k, v, packing)
            sub.project_add(offset + start, offset + end, q)
        return x

    def attention_recompute(
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
        group = self.begin("attention_recompute", name, x)
        _, tokens, _ = x.shape
        nh, nkv, hd = spec.num_heads, spec.num_kv_heads, spec.head_dim
        block, parts = self.sequence_spans(packing, group)
        item = x.element_size()
        # Per key chunk, the kernel's output, log-sum-exp and packed keys and values, and the
        # merge's float32 copy of that output.
        self.mem.workspace(nh * block * (hd * item + 4) + nh * block * hd * 4)
        self.mem.workspace(self.rules.key_copy_bytes(block, nkv, hd))
        self.mem.workspace(chunk_attention_workspace(nh, block, block, hd, self.rules.device))
        outputs = self.mem.new((tokens, nh * hd), x.dtype)  # every query block's attention output
        keys, values = (self.mem.new((block, nkv, hd), x.dtype) for _ in range(2))
        q = self.mem.new((block, nh * hd), x.dtype)
        merged = self.mem.new((nh, block, hd), torch.float32)  # the output so far, normalised
        total, scale = (self.mem.new((nh, block), torch.float32) for _ in range(2))  # log-sum-exps so far
        sub = RegionRows(self, x, spec, layer, packing)
        if self.mem.tracing:
            return x
        blocks: dict[int, list[tuple[int, int]]] = {}
        for offset, _, start, end in parts:
            blocks.setdefault(offset, []).append((start, end))
        predicting = is_predicting()
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

    def query_blocks(self, packing: Packing, group: OpGroup) -> tuple[int, list[QueryBlock]]:
        """(the largest block, every query block): each sequence's attention calls
        (`Packing.segments`: one, or a block-diffusion prefill's and a block's), each in the
        group's chunks; a trace runs only the first. The largest block is the whole sequences'
        (what the trace sizes buffers by): a call's blocks are no larger."""
        pieces = getattr(self.chunks, group.name)
        if self.mem.tracing:
            size = self.mem.chunk_size(packing.lengths, group, pieces)
            return size, [QueryBlock(0, 0, packing.lengths[0], 0, size, packing.lengths[0])]
        size = max(largest_chunk(n, pieces, group) for n in packing.lengths)
        parts = [
            QueryBlock(i, o, n, seg.first + s, seg.first + e, seg.keys, seg.block)
            for i, (o, n) in enumerate(packing.sequences())
            for seg in packing.segments(i)
            for s, e in group_spans(seg.last - seg.first, pieces, group)
        ]
        if max(p.end - p.start for p in parts) > size:
            raise ValueError(f"a query block of an attention call exceeds the step's largest ({size})")
        return size, parts

    def window_buffers(self, packing: Packing, k: Tensor) -> list[Tensor] | None:
        """Two planned (1, canvas, kv heads, hd) buffers for windows' spliced keys and values,
        sized for the longest window's canvas and reused sequence after sequence (None: no window)."""
        canvases = [w.length for i in range(len(packing.lengths)) if (w := packing.window(i))]
        if not canvases:
            return None
        return [self.mem.new((1, max(canvases), *k.shape[2:]), k.dtype) for _ in range(2)]

    @staticmethod
    def spliced(
        use: CacheUse, layer: int, k: Tensor, v: Tensor, spliced: list[Tensor], first_block: bool
    ) -> tuple[Tensor, Tensor]:
        """A window's keys and values: its cache's with its own fresh (1, n, ...) K and V in place,
        written into `spliced` at the sequence's first query block and read by the others."""
        if first_block:
            use.cache.splice(layer, k[0], v[0], use.start, use.length, (spliced[0][0], spliced[1][0]))
        return spliced[0][:, : use.length], spliced[1][:, : use.length]


class QueryBlock(NamedTuple):
    """Queries [start, end) of sequence `sequence` (packed at `offset`, `length` tokens) against its
    canvas keys [0, keys); `block` > 0: block-causally, through a mask."""

    sequence: int
    offset: int
    length: int
    start: int
    end: int
    keys: int
    block: int = 0

    def mask(self, packing: Packing, dtype: torch.dtype, device: torch.device) -> Tensor | None:
        if not self.block:
            return None
        first = packing.starts[self.sequence] + self.start
        return block_causal_mask(first, self.end - self.start, self.keys, self.block, dtype, device)

    def attend_into(self, queries: Tensor, keys: Tensor, values: Tensor, packing: Packing) -> None:
        """The fused kernel on token-major (1, m, heads, hd) `queries` against the call's first
        `keys` of (1, n, kv heads, hd) `keys` and `values` (grouped kv heads read by the kernel:
        no copies), its output written over the queries."""
        gqa = {"enable_gqa": True} if queries.shape[2] != keys.shape[2] else {}
        result = F.scaled_dot_product_attention(
            queries.transpose(1, 2),
            keys[:, : self.keys].transpose(1, 2),
            values[:, : self.keys].transpose(1, 2),
            attn_mask=self.mask(packing, queries.dtype, queries.device),
            dropout_p=0.0,
            is_causal=False,
            **gqa,
        )
        queries.copy_(result.transpose(1, 2))


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


class RegionRows:
    """The attention regions' row work, `REGION_ROWS` rows at a time in planned scratch: the
    attention norm, K/V or q projections with head norms and rotary (tables built for the rows'
    own positions), the output projection and residual add. The same arithmetic as the op-by-op
    path, row by row."""

    def __init__(self, ops: AttentionOps, x: Tensor, spec: ArchSpec, layer: dict[str, Tensor], packing: Packing):
        mem, width, nh = ops.mem, x.shape[-1], spec.num_heads
        self.ops, self.spec, self.layer, self.rows = ops, spec, layer, x.view(-1, width)
        self.bias = {p: layer.get(f"{p}_bias") for p in ("q", "k", "v", "o")}
        ops.gemm_workspace(x, layer["q"], layer["k"], layer["v"])
        mem.workspace(tile_workspace(x, layer["o"], ops.gemm_rule(layer["o"])))
        sub, rd = REGION_ROWS, spec.rotary_dim
        self.scratch = ops.norm_scratch(sub, width)
        self.h = mem.new((sub, width), x.dtype)
        self.projected = mem.new((sub, width), x.dtype)
        self.heads_scratch = ops.norm_scratch(sub * nh, spec.head_dim) if spec.qk_norm else None
        work = torch.float32 if spec.rope_full_precision else x.dtype
        self.first, self.rotated = (mem.new((sub, nh, rd), work) for _ in range(2))
        self.tables = ops.table_buffers(sub, rd, None if spec.rope_full_precision else x.dtype)
        self.positions = ops.token_positions(packing, x.device)

    def _pieces(self, first: int, last: int) -> list[slice]:
        return [slice(a, min(a + REGION_ROWS, last)) for a in range(first, last, REGION_ROWS)]

    def _normed(self, at: slice) -> Tensor:
        n = at.stop - at.start
        self.ops.norm_rows(self.rows[at], self.layer["attn_norm"], self.spec.rms_norm_eps, self.scratch, self.h[:n])
        return self.h[:n]

    def _heads(self, weight: str, out: Tensor, at: slice) -> None:
        """out (n, heads * hd) = rotary(head norm(h @ W.T + b)) at the rows' positions."""
        spec, n = self.spec, at.stop - at.start
        hd, rd = spec.head_dim, spec.rotary_dim
        count = out.shape[-1] // hd
        self.ops.project(self.h[:n], self.layer[weight], self.bias[weight], out)
        if self.heads_scratch is not None:
            flat = out.view(n * count, hd)
            self.ops.norm_rows(flat, self.layer[f"{weight}_norm"], spec.rms_norm_eps, self.heads_scratch, flat)
        self.tables[0][:n].copy_(self.positions[at])
        cos, sin = self.ops.fill_tables(self.tables, n, spec.rope_theta)
        part = out.view(n, count, hd)[..., :rd]
        self.ops.rotate(part, cos.unsqueeze(1), sin.unsqueeze(1), self.first[:n, :count], self.rotated[:n, :count])

    def keys_values(self, first: int, last: int, keys: Tensor, values: Tensor) -> None:
        """K and V of packed rows [first, last) into keys, values ((last - first, nkv, hd) each)."""
        width = self.spec.num_kv_heads * self.spec.head_dim
        for at in self._pieces(first, last):
            rows = slice(at.start - first, at.stop - first)
            self._normed(at)
            self._heads("k", keys[rows].view(-1, width), at)
            h = self.h[: at.stop - at.start]
            self.ops.project(h, self.layer["v"], self.bias["v"], values[rows].view(-1, width))

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
            self.ops.project(attended[row : row + n], self.layer["o"], self.bias["o"], self.projected[:n])
            self.rows[at].add_(self.projected[:n])
