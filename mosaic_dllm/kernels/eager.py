"""The eager kernels: plain torch, fresh tensors, every op as the official modeling code computes it.

Each op reproduces the official arithmetic, dtype by dtype, so that tokens match; the eager
executor (`runtime/eager.py`) runs the model description with them: the baseline and the oracle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.kv_cache import block_causal_mask
from ..models.ops import RowHead
from ..models.packing import Packing
from ..models.quantized import QuantizedWeight, linear
from ..models.spec import MoESpec

Linear = Callable[..., Tensor]  # (x, weight, bias=None) -> x @ weight.T (+ bias); weights may be quantized


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swiglu(x: Tensor, gate: Tensor, up: Tensor, down: Tensor, mm: Linear = linear) -> Tensor:
    """The official SwiGLU; `mm` multiplies (tensor parallel kernels pass one that gathers)."""
    return mm(F.silu(mm(x, gate)) * mm(x, up), down)


def route_and_run_experts(
    flat: Tensor,
    router: Tensor,
    expert_bias: Tensor | None,
    experts: list[dict[str, Tensor]],
    moe: MoESpec,
    out: Tensor,
    linear: Linear = linear,
    mlp: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] = swiglu,
) -> None:
    """The official MoE layer over (T, H) tokens, accumulated into the zeroed (T, H) `out`;
    `linear` computes the router and `mlp` the experts (the planned kernels pass batch-invariant ones).
    Each expert runs once on its rows, in the official order (a row's bits may depend on its place
    in the call)."""
    if moe.score == "sigmoid":
        run_sigmoid_experts(flat, router, expert_bias, experts, moe, out, linear, mlp)
        return
    weights = F.softmax(linear(flat, router), dim=1, dtype=torch.float)
    if expert_bias is not None:
        weights = weights + expert_bias
    weights, chosen = torch.topk(weights, moe.experts_per_token, dim=-1)
    if moe.normalize_top_k:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    weights = weights.to(flat.dtype)
    expert_mask = F.one_hot(chosen, num_classes=len(experts)).permute(2, 1, 0)
    for e, expert in enumerate(experts):  # expert order matters: bf16 index_add rounds each sum
        slot, token = torch.where(expert_mask[e])  # slot by slot, as transformers' MoE
        if token.numel() == 0:
            continue
        y = mlp(flat[token], expert["gate"], expert["up"], expert["down"])
        out.index_add_(0, token, (y * weights[token, slot, None]).to(flat.dtype))


def run_sigmoid_experts(
    flat: Tensor,
    router: Tensor,
    expert_bias: Tensor | None,
    experts: list[dict[str, Tensor]],
    moe: MoESpec,
    out: Tensor,
    linear: Linear,
    mlp: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor],
) -> None:
    """LLaDA2.x's moe_infer: each expert's rows as its (unstable) argsort of the flattened choices
    orders them, every slot's output weighted in float32, the slots summed in float32."""
    weights, chosen = sigmoid_routing(flat, router, expert_bias, moe, linear)
    slots = flat.new_zeros((*chosen.shape, flat.shape[-1]), dtype=torch.float32)  # (T, k, H)
    order = chosen.view(-1).argsort()
    ranked = chosen.view(-1)[order]
    for e, expert in enumerate(experts):
        picked = order[ranked == e]
        if picked.numel() == 0:
            continue
        token, slot = picked // moe.experts_per_token, picked % moe.experts_per_token
        y = mlp(flat[token], expert["gate"], expert["up"], expert["down"])
        slots[token, slot] = y.float() * weights[token, slot, None]
    out.copy_(slots.sum(dim=1))


def sigmoid_routing(
    flat: Tensor, router: Tensor, expert_bias: Tensor | None, moe: MoESpec, linear: Linear = linear
) -> tuple[Tensor, Tensor]:
    """LLaDA2.x's gate: float32 router logits and sigmoid scores; the expert bias added for
    choosing only; the top k among the experts of the `top_groups` groups whose two best scores
    sum highest; the chosen scores renormalised (with k > 1) and scaled. (weights, chosen), (T, k)."""
    scores = torch.sigmoid(linear(flat.float(), router.float()))
    choosing = scores + expert_bias if expert_bias is not None else scores
    tokens = choosing.shape[0]
    group_scores = choosing.view(tokens, moe.groups, -1).topk(2, dim=-1)[0].sum(dim=-1)
    best_groups = torch.topk(group_scores, k=moe.top_groups, dim=-1, sorted=False)[1]
    keep = torch.zeros_like(group_scores).scatter_(1, best_groups, 1).bool()
    keep = keep.unsqueeze(-1).expand(tokens, moe.groups, moe.num_experts // moe.groups).reshape(tokens, -1)
    chosen = torch.topk(choosing.masked_fill(~keep, float("-inf")), k=moe.experts_per_token, dim=-1)[1]
    weights = torch.gather(scores, 1, chosen)
    if moe.experts_per_token > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * moe.scaling, chosen


class EagerOps:
    """Implements `models.ops.Ops` the way the official code does. `float_logits`: the official
    forward returns its logits in float32 (`ArchSpec.float_logits`)."""

    float_logits = False  # the parallel eager kernels keep it: their logits feed samplers only

    def __init__(self, float_logits: bool = False):
        self.float_logits = float_logits

    def embed(self, ids: Tensor, table: Tensor | QuantizedWeight, *, name: str) -> Tensor:
        return table.rows(ids) if isinstance(table, QuantizedWeight) else F.embedding(ids, table)

    def rotary_tables(
        self, length: int, rotary_dim: int, theta: float, dtype: torch.dtype | None, device: torch.device, *, name: str
    ) -> tuple[Tensor, Tensor]:
        inv_freq = 1.0 / (
            theta ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.int64).float() / rotary_dim)
        )
        positions = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if dtype is not None:
            cos, sin = cos.to(dtype), sin.to(dtype)
        return cos, sin

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, *, name: str, overwrite: bool = False) -> Tensor:
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return weight * xf.to(x.dtype)

    def multiply(self, x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """x @ weight.T (+ bias): every product these kernels take (the tensor parallel ones gather)."""
        return linear(x, weight, bias)

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, *, name: str) -> Tensor:
        return self.multiply(x, weight, bias)

    def rotary(
        self, x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool, packing: Packing, *, name: str
    ) -> Tensor:
        """Elementwise, so gathering each token's row of the tables computes what the official
        (B, nh, L, hd) broadcast does."""
        return self.rotate(x, cos, sin, full_precision, packing.positions(x.device))

    @staticmethod
    def rotate(x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool, positions: Tensor) -> Tensor:
        """Rotate (1, T, nh, hd) tokens by the tables' rows at their `positions` (T,)."""
        cos, sin = cos[positions].unsqueeze(1), sin[positions].unsqueeze(1)  # (T, 1, rd)
        rd = cos.shape[-1]
        part, rest = (x, None) if rd == x.shape[-1] else (x[..., :rd], x[..., rd:])
        if full_precision:  # LLaDA: rotate in float32, cast back
            pf = part.float()
            out = ((pf * cos) + (rotate_half(pf) * sin)).to(x.dtype)
        else:  # Dream / LLaDA-MoE: tables already in x's dtype
            out = (part * cos) + (rotate_half(part) * sin)
        return out if rest is None else torch.cat((out, rest), dim=-1)

    def attention(self, q: Tensor, k: Tensor, v: Tensor, packing: Packing, layer: int, *, name: str) -> Tensor:
        """Sequences of one length (one request) in one call on (B, nh, L, hd), as the official code;
        others one sequence per call (the CPU kernel's rows do not depend on the batch, tested).
        A window attends to its cache's keys with its own in place (Fast-dLLM's cached forward); a
        block-diffusion sequence makes the official calls (`Packing.segments`): a prefill's
        queries against its keys with the block-causal mask, a block's against every key before
        its end."""
        _, tokens, nh, hd = q.shape
        packing.store_caches(layer, k, v)
        if packing.is_uniform and packing.plain:
            return self._attend(q, k, v, len(packing.lengths)).view(1, tokens, nh * hd)
        parts = []
        for i, (o, n) in enumerate(packing.sequences()):
            keys, values = k[:, o : o + n], v[:, o : o + n]
            if (use := packing.window(i)) is not None:
                keys = k.new_empty((1, use.length, *k.shape[2:]))
                values = v.new_empty((1, use.length, *v.shape[2:]))
                use.cache.splice(layer, k[0, o : o + n], v[0, o : o + n], use.start, use.length, (keys[0], values[0]))
            first = packing.starts[i]
            for seg in packing.segments(i):
                mask = None
                if seg.block:
                    mask = block_causal_mask(
                        first + seg.first, seg.last - seg.first, seg.keys, seg.block, q.dtype, q.device
                    )
                queries = q[:, o + seg.first : o + seg.last]
                parts.append(self._attend(queries, keys[:, : seg.keys], values[:, : seg.keys], 1, mask))
        return torch.cat(parts, dim=1).view(1, tokens, nh * hd)

    @staticmethod
    def _attend(q: Tensor, k: Tensor, v: Tensor, batch: int, mask: Tensor | None = None) -> Tensor:
        """Token-major (1, B * L, heads, hd) queries and (1, B * K, kv heads, hd) keys and values ->
        (B, L, nh * hd) over B sequences of one length; `mask`: additive (L, K)."""
        _, tokens, nh, hd = q.shape
        q = q.reshape(batch, tokens // batch, nh, hd).transpose(1, 2)
        k, v = (t.reshape(batch, t.shape[1] // batch, t.shape[2], hd).transpose(1, 2) for t in (k, v))
        groups = nh // k.shape[1]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
        return out.transpose(1, 2).contiguous().view(batch, tokens // batch, nh * hd)

    def attention_in_query_blocks(self) -> bool:
        return False  # the official code runs the attention block op by op

    def attention_region(self, *args, name: str) -> Tensor:
        raise NotImplementedError("the eager kernels run the attention block op by op, as the official code")

    def mlp(self, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, *, name: str) -> Tensor:
        return swiglu(x, gate, up, down, self.multiply)

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
        flat = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(flat)
        expert = partial(swiglu, mm=self.multiply)
        route_and_run_experts(flat, router, expert_bias, experts, moe, out, self.multiply, expert)
        return out.view(x.shape)

    def add(self, x: Tensor, y: Tensor, *, name: str) -> Tensor:
        return x + y

    # Token-local regions: what the official code runs op by op.
    def norm_linears(
        self,
        x: Tensor,
        norm_weight: Tensor,
        eps: float,
        linears: list[tuple[Tensor, Tensor | None]],
        *,
        names: tuple[str, ...],
    ) -> list[Tensor]:
        h = self.rms_norm(x, norm_weight, eps, name=names[0])
        return [self.linear(h, w, b, name=n) for (w, b), n in zip(linears, names[1:], strict=True)]

    def linear_add(
        self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, *, names: tuple[str, str]
    ) -> Tensor:
        return self.add(x, self.linear(y, weight, bias, name=names[0]), name=names[1])

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
        h = self.rms_norm(x, norm_weight, eps, name=names[0])
        return self.add(x, self.mlp(h, gate, up, down, name=names[1]), name=names[2])

    def lm_head(
        self, hidden: Tensor, weight: Tensor, packing: Packing, batch: int, chunk: int, *, name: str
    ) -> RowHead:
        """Single use: with rows None (the official forward) the hidden states are let go before the
        logits are computed, as the official forward returns logits alone."""
        held = [hidden]

        def head(first: int, count: int, rows: Tensor | None) -> Iterator[tuple[Tensor, Tensor]]:
            start, length = packing.offsets[first], packing.lengths[first]
            h = held.pop()[0, start : start + count * length].view(count, length, -1)
            if rows is None:  # every position at once
                positions, logits = torch.arange(length, device=h.device), self.multiply(h, weight)
                del h
                yield positions, logits.float() if self.float_logits else logits
                return
            step = chunk or max(1, rows.numel())
            for at in range(0, rows.numel(), step):
                part = rows[at : at + step]
                yield part, self.multiply(h[:, part], weight)

        return head
