"""Fast-dLLM's block K/V cache of one sequence: what lives across the steps of a block.

A block's first step runs the whole canvas and stores every layer's K (normalised and rotated) and
V of canvas positions [0, keep): the prompt and finished blocks (`prefix`), or every position
(`dual`). The block's other steps run only a window of the canvas through the layers; the window's
queries attend to the cached K/V with the window's own fresh K/V in its place. Storing K rotated is
what the reference computes: it caches K before rotary and rotates every key again at each step,
an elementwise op that gives the same bits as rotating once.

The cache is allocated once at its largest size (`positions`), when it is first stored, so its
bytes are fixed for the request's life and counted by every plan the request runs under.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .spec import ArchSpec


class BlockCache:
    """Every layer's K and V, token-major (positions, kv heads, head dim), of one sequence."""

    def __init__(self, spec: ArchSpec, positions: int):
        self.layers, self.positions = spec.num_layers, positions
        self.width = (spec.num_kv_heads, spec.head_dim)
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []

    def nbytes(self, dtype: torch.dtype) -> int:
        return 2 * self.layers * self.positions * self.width[0] * self.width[1] * dtype.itemsize

    def store(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Keep (n, kv heads, head dim) K and V of positions [0, n) of `layer` (allocating on first use)."""
        if not self.keys:
            shape = (self.positions, *self.width)
            self.keys = [torch.empty(shape, dtype=k.dtype, device=k.device) for _ in range(self.layers)]
            self.values = [torch.empty(shape, dtype=v.dtype, device=v.device) for _ in range(self.layers)]
        self.keys[layer][: k.shape[0]].copy_(k)
        self.values[layer][: v.shape[0]].copy_(v)

    def splice(self, layer: int, k: Tensor, v: Tensor, start: int, length: int, out: tuple[Tensor, Tensor]) -> None:
        """Write into `out` the `length` keys and values a window attends to: the cached ones, with
        the window's fresh (n, ...) K and V at positions [start, start + n)."""
        end = start + k.shape[0]
        for cached, fresh, dst in ((self.keys[layer], k, out[0]), (self.values[layer], v, out[1])):
            dst[:start].copy_(cached[:start])
            dst[start:end].copy_(fresh)
            dst[end:length].copy_(cached[end:length])

    def release(self) -> None:
        self.keys, self.values = [], []


@dataclass(frozen=True)
class CacheUse:
    """How one sequence of a step uses its cache: `refresh` runs the whole canvas and stores
    positions [0, keep); otherwise the sequence is a window that starts at canvas position `start`
    of a canvas of `length` positions, and attends to the cache."""

    cache: BlockCache
    refresh: bool
    start: int = 0
    length: int = 0
    keep: int = 0
