"""The coarse operations a model description is written against.

An executor's kernels implement them: the eager kernels with fresh torch tensors, exactly as the
official code computes them (`kernels/eager.py`); the planned kernels with planned buffers, chunks
and row selection (`kernels/planned.py`). Every call carries a `name` so that executors can label
what they run (timelines, plans); each method belongs to one op group (`groups.py`).
Shapes: B batch, L sequence, H hidden, nh heads, hd head dim, V vocabulary, C logits rows.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor


class Ops(Protocol):
    def embed(self, ids: Tensor, table: Tensor, *, name: str) -> Tensor:
        """(B, L) ids -> (B, L, H)."""

    def rotary_tables(
        self, length: int, rotary_dim: int, theta: float, dtype: torch.dtype | None, device: torch.device, *, name: str
    ) -> tuple[Tensor, Tensor]:
        """cos, sin of shape (L, rotary_dim), float32, or cast to `dtype` when given."""

    def rms_norm(self, x: Tensor, weight: Tensor, eps: float, *, name: str, overwrite: bool = False) -> Tensor:
        """RMSNorm over the last dim, statistics in float32, weight applied in x's dtype.
        `overwrite`: x is not read afterwards, executors may write the result into it."""

    def linear(self, x: Tensor, weight: Tensor, bias: Tensor | None, *, name: str) -> Tensor:
        """x @ weight.T (+ bias)."""

    def norm_linears(
        self,
        x: Tensor,
        norm_weight: Tensor,
        eps: float,
        linears: list[tuple[Tensor, Tensor | None]],
        *,
        names: tuple[str, ...],
    ) -> list[Tensor]:
        """[linear(rms_norm(x)) for each (weight, bias)]: a norm feeding projections, token by token.
        `names`: the norm's, then each projection's."""

    def linear_add(
        self, x: Tensor, y: Tensor, weight: Tensor, bias: Tensor | None, *, names: tuple[str, str]
    ) -> Tensor:
        """x + linear(y): a projection into the residual stream; executors may write into x.
        `names`: the projection's, the add's."""

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
        """x + mlp(rms_norm(x)); executors may write into x. `names`: the norm's, the MLP's, the add's."""

    def rotary(self, x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool, *, name: str) -> Tensor:
        """Rotate (B, nh, L, hd) by the tables; only the first cos.shape[-1] dims rotate."""

    def attention(self, q: Tensor, k: Tensor, v: Tensor, *, name: str) -> Tensor:
        """Bidirectional attention: (B, nh, L, hd), (B, nkv, L, hd) x2 -> (B, L, nh * hd)."""

    def mlp(self, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, *, name: str) -> Tensor:
        """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

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
        """Softmax-routed mixture of SwiGLU experts over the tokens of x (B, L, H)."""

    def add(self, x: Tensor, y: Tensor, *, name: str) -> Tensor:
        """Residual add; executors may write into x."""

    def lm_head(
        self, hidden: Tensor, weight: Tensor, rows: Tensor | None, chunk: int | None, *, name: str
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """(hidden rows (C,), (B, C, V) logits) chunks: of `rows`, `chunk` at a time, or of every
        position in one chunk when `rows` is None (as the official forward returns them). A chunk's
        logits may live in a buffer the next chunk reuses: consume them before advancing."""
