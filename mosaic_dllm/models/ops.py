"""The coarse operations a model description is written against.

An executor's kernels implement them: the eager kernels with fresh torch tensors, exactly as the
official code computes them (`kernels/eager.py`); the planned kernels with planned buffers, chunks
and row selection (`kernels/planned.py`). Every call carries a `name` so that executors can label
what they run (timelines, plans); each method belongs to one op group (`groups.py`).
Shapes: T packed tokens (every sequence of the step, `packing.py`), L one sequence, B one request's
sequences (2 with guidance), H hidden, nh heads, hd head dim, V vocabulary, C logits rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import torch
from torch import Tensor

from .packing import Packing
from .spec import ArchSpec, MoESpec

# An LM head over a step's final hidden states: (first sequence, sequences, hidden rows or None for
# every row) -> (hidden rows (C,), (B, C, V) logits) chunks of that request.
RowHead = Callable[[int, int, Tensor | None], Iterator[tuple[Tensor, Tensor]]]


class Ops(Protocol):
    def embed(self, ids: Tensor, table: Tensor, *, name: str) -> Tensor:
        """(1, T) ids -> (1, T, H)."""

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

    def rotary(
        self, x: Tensor, cos: Tensor, sin: Tensor, full_precision: bool, packing: Packing, *, name: str
    ) -> Tensor:
        """Rotate (1, T, nh, hd) by the tables, each token by its position in its own sequence;
        only the first cos.shape[-1] dims rotate."""

    def attention(self, q: Tensor, k: Tensor, v: Tensor, packing: Packing, layer: int, *, name: str) -> Tensor:
        """Bidirectional attention within each sequence: (1, T, nh, hd), (1, T, nkv, hd) x2 -> (1, T, nh * hd).
        With block caches (`packing.caches`): a refreshing sequence stores its K and V of `layer`, a
        window's queries attend to the cached K and V with its own in their place."""

    def attention_in_query_blocks(self) -> bool:
        """Whether the attention block runs as one region in query blocks (`attention_region`)
        instead of op by op."""

    def attention_region(
        self, x: Tensor, spec: ArchSpec, layer: dict[str, Tensor], index: int, packing: Packing, *, name: str
    ) -> Tensor:
        """The whole attention block, x + o(attention(rotary(norm(q(n(x)))), K, V)), with K and V
        first computed for every token and then, query block by query block, the block's norm, q,
        q-norm, rotary (tables for the block's positions only), attention, output projection and
        residual add: no full-length q, attention output or rotary table. Same arithmetic, row by row."""

    def mlp(self, x: Tensor, gate: Tensor, up: Tensor, down: Tensor, *, name: str) -> Tensor:
        """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

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
        """A routed mixture of SwiGLU experts over the tokens of x (1, T, H), routed as `moe` says."""

    def add(self, x: Tensor, y: Tensor, *, name: str) -> Tensor:
        """Residual add; executors may write into x."""

    def lm_head(
        self, hidden: Tensor, weight: Tensor, packing: Packing, batch: int, chunk: int, *, name: str
    ) -> RowHead:
        """The LM head over (1, T, H) hidden states, run as a request's chunks are consumed: of the
        requested rows, `chunk` at a time, or of every row in one chunk when the rows are None (as
        the official forward returns them). `batch`: the most sequences of one request. A chunk's
        logits may live in a buffer the next chunk reuses: consume them before advancing."""
