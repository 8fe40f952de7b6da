"""The one description of a denoising forward pass, shared by every family and every executor.

Pre-norm bidirectional transformer: embed, then per layer attention and FFN (dense SwiGLU or MoE)
with residual adds, then the final norm and the LM head over the rows a sampler reads. Family quirks
come from `ArchSpec`; what each op does with memory is the kernels' business (`kernels/`).
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor

from .ops import Ops
from .spec import ArchSpec
from .weights import Weights


def hidden_states(ops: Ops, spec: ArchSpec, w: Weights, ids: Tensor) -> Tensor:
    """(B, L) token ids -> (B, L, H) normalised final hidden states."""
    x = ops.embed(ids, w.embed, name="embed")
    tables_dtype = None if spec.rope_full_precision else x.dtype
    cos, sin = ops.rotary_tables(
        ids.shape[1], spec.rotary_dim, spec.rope_theta, tables_dtype, ids.device, name="rotary_tables"
    )
    for i, layer in enumerate(w.layers):
        x = attention_block(ops, spec, layer, x, cos, sin)
        x = ffn_block(ops, spec, layer, w.experts[i], i, x)
    return ops.rms_norm(x, w.final_norm, spec.rms_norm_eps, name="final_norm")


def attention_block(ops: Ops, spec: ArchSpec, layer: dict[str, Tensor], x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    b, length, _ = x.shape
    q, k, v = ops.norm_linears(
        x,
        layer["attn_norm"],
        spec.rms_norm_eps,
        [(layer[p], layer.get(f"{p}_bias")) for p in ("q", "k", "v")],
        names=("attn_norm", "q_proj", "k_proj", "v_proj"),
    )
    q = q.view(b, length, spec.num_heads, spec.head_dim)
    k = k.view(b, length, spec.num_kv_heads, spec.head_dim)
    if spec.qk_norm:  # per head, before the heads move in front of the sequence
        q = ops.rms_norm(q, layer["q_norm"], spec.rms_norm_eps, name="q_norm", overwrite=True)
        k = ops.rms_norm(k, layer["k_norm"], spec.rms_norm_eps, name="k_norm", overwrite=True)
    q = q.transpose(1, 2)  # (B, nh, L, hd)
    k = k.transpose(1, 2)
    v = v.view(b, length, spec.num_kv_heads, spec.head_dim).transpose(1, 2)
    q = ops.rotary(q, cos, sin, spec.rope_full_precision, name="rotary_q")
    k = ops.rotary(k, cos, sin, spec.rope_full_precision, name="rotary_k")
    a = ops.attention(q, k, v, name="attention")  # (B, L, nh * hd)
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
        spec.moe.experts_per_token,
        spec.moe.normalize_top_k,
        name="moe",
    )
    if spec.moe.shared_expert_intermediate_size:
        shared = ops.mlp(h, layer["shared_gate"], layer["shared_up"], layer["shared_down"], name="shared_expert")
        f = ops.add(f, shared, name="shared_expert_add")
    return ops.add(x, f, name="ffn_residual")


def logits(
    ops: Ops, spec: ArchSpec, w: Weights, ids: Tensor, rows: Tensor | None = None, chunk: int | None = None
) -> Iterator[tuple[Tensor, Tensor]]:
    """(B, L) ids -> (hidden rows, (B, C, V) logits) chunks for the hidden rows `rows`, `chunk` at a
    time; rows None: every position in one chunk, as the official forward returns them. The body
    runs when this is called; the LM head as the chunks are consumed."""
    return ops.lm_head(hidden_states(ops, spec, w, ids), w.lm_head, rows, chunk, name="lm_head")
