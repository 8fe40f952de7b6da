"""The one description of a denoising forward pass, shared by every family and every executor.

Pre-norm bidirectional transformer: embed, then per layer attention and FFN (dense SwiGLU or MoE)
with residual adds, then the final norm and the LM head over the rows a sampler reads. Family quirks
come from `ArchSpec`; what each op does with memory is the kernels' business (`kernels/`).

A step runs on packed sequences (`packing.py`): every request's canvas rows one after another as
(1, T) ids; token-local ops see all T tokens, rotary and attention each sequence alone.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from .kv_cache import CacheUse
from .ops import Ops, RowHead
from .packing import Packing
from .spec import ArchSpec
from .weights import Weights


def hidden_states(ops: Ops, spec: ArchSpec, w: Weights, ids: Tensor, packing: Packing) -> Tensor:
    """(1, T) packed token ids -> (1, T, H) normalised final hidden states."""
    x = ops.embed(ids, w.embed, name="embed")
    tables_dtype = None if spec.rope_full_precision else x.dtype
    cos, sin = ops.rotary_tables(
        packing.span, spec.rotary_dim, spec.rope_theta, tables_dtype, ids.device, name="rotary_tables"
    )
    for i, layer in enumerate(w.layers):
        x = attention_block(ops, spec, layer, i, x, cos, sin, packing)
        x = ffn_block(ops, spec, layer, w.experts[i], i, x)
    # At the floor (attention in query blocks) the final norm writes over the residual stream, which
    # nothing reads again: two full-length buffers would exceed the residual stream plus K and V.
    at_floor = ops.attention_in_query_blocks()
    return ops.rms_norm(x, w.final_norm, spec.rms_norm_eps, name="final_norm", overwrite=at_floor)


def attention_block(
    ops: Ops,
    spec: ArchSpec,
    layer: dict[str, Tensor],
    index: int,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    packing: Packing,
) -> Tensor:
    if ops.attention_in_query_blocks():  # the attention group chunked: one region, no full-length q
        return ops.attention_region(x, spec, layer, index, packing, name="attention_region")
    b, tokens, _ = x.shape
    q, k, v = ops.norm_linears(
        x,
        layer["attn_norm"],
        spec.rms_norm_eps,
        [(layer[p], layer.get(f"{p}_bias")) for p in ("q", "k", "v")],
        names=("attn_norm", "q_proj", "k_proj", "v_proj"),
    )
    q = q.view(b, tokens, spec.num_heads, spec.head_dim)  # token-major: (1, T, heads, hd)
    k = k.view(b, tokens, spec.num_kv_heads, spec.head_dim)
    v = v.view(b, tokens, spec.num_kv_heads, spec.head_dim)
    if spec.qk_norm:  # per head
        q = ops.rms_norm(q, layer["q_norm"], spec.rms_norm_eps, name="q_norm", overwrite=True)
        k = ops.rms_norm(k, layer["k_norm"], spec.rms_norm_eps, name="k_norm", overwrite=True)
    q = ops.rotary(q, cos, sin, spec.rope_full_precision, packing, name="rotary_q")
    k = ops.rotary(k, cos, sin, spec.rope_full_precision, packing, name="rotary_k")
    a = ops.attention(q, k, v, packing, index, name="attention")  # (1, T, nh * hd)
    return ops.linear_add(x, a, layer["o"], layer.get("o_bias"), names=("o_proj", "attn_residual"))


def ffn_block(
    ops: Ops, spec: ArchSpec, layer: dict[str, Tensor], experts: list[dict[str, Tensor]], index: int, x: Tensor
) -> Tensor:
    if not spec.is_moe_layer(index):
        return ops.norm_mlp_add(
            x,
            layer["ffn_norm"],
            spec.rms_norm_eps,
            layer["gate"],
            layer["up"],
            layer["down"],
            names=("ffn_norm", "mlp", "ffn_residual"),
        )
    h = ops.rms_norm(x, layer["ffn_norm"], spec.rms_norm_eps, name="ffn_norm")
    f = ops.moe(
        h,
        layer["router"],
        layer.get("expert_bias"),
        experts,
        spec.moe,
        name="moe",
    )
    if spec.moe.shared_expert_intermediate_size:
        shared = ops.mlp(h, layer["shared_gate"], layer["shared_up"], layer["shared_down"], name="shared_expert")
        f = ops.add(f, shared, name="shared_expert_add")
    return ops.add(x, f, name="ffn_residual")


def check_uses(spec: ArchSpec, caches: tuple[CacheUse | None, ...]) -> None:
    """A block-diffusion model's attention is block-causal over its decoding's blocks, which each
    sequence's cache use states (`CacheUse.block`): without one, a forward pass would attend
    bidirectionally and compute another model."""
    if spec.block_size and not all(use is not None and use.block for use in caches):
        raise ValueError(
            f"a block-diffusion model ({spec.family}) runs through its sampler's steps (block-causal attention "
            "over its K/V cache), not as a bidirectional forward over a canvas"
        )


def forward(ops: Ops, spec: ArchSpec, w: Weights, ids: Tensor, packing: Packing, batch: int, chunk: int) -> RowHead:
    """(1, T) packed ids -> the LM head over the final hidden states: call it with a request's
    sequences and rows for that request's (rows, (B, C, V) logits) chunks. `batch`: the most
    sequences of one request (2 with guidance); `chunk`: logits rows per chunk. The body runs when
    this is called, the LM head as the chunks are consumed."""
    return ops.lm_head(hidden_states(ops, spec, w, ids, packing), w.lm_head, packing, batch, chunk, name="lm_head")


def logits(
    ops: Ops,
    spec: ArchSpec,
    w: Weights,
    ids: Tensor,
    rows: Tensor | None = None,
    chunk: int | None = None,
    cache: CacheUse | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """One canvas: (B, L) ids -> (hidden rows, (B, C, V) logits) chunks for the hidden rows `rows`,
    `chunk` at a time; rows None: every position in one chunk, as the official forward returns them.
    `cache`: how the canvas (then a window, for a window step) uses a block cache."""
    b, length = ids.shape
    chunk = chunk or (rows.numel() if rows is not None and rows.numel() else length)
    check_uses(spec, (cache,) * b)
    packing = Packing((length,) * b, (cache,) * b if cache is not None else ())
    head = forward(ops, spec, w, ids.reshape(1, -1), packing, b, chunk)
    return head(0, b, rows)
