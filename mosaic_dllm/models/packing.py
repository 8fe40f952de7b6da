"""Sequences packed one after another along the token dimension: how a batched step is laid out.

Token-local ops (norms, projections, FFN, MoE, the LM head) see one (1, T, ...) tensor of every
sequence's tokens; rotary and attention run per sequence (no padding, no attention across
sequences). A request contributes one sequence, two with classifier-free guidance (conditional
then unconditional, adjacent). One request alone is a packing too: its B sequences in canvas order,
which is exactly the (B, L) layout the official code flattens.

A sequence may also be a window of a longer canvas that attends to a block cache (`kv_cache.py`):
its tokens sit at canvas positions [start, start + n) and its keys span the whole canvas.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from .kv_cache import CacheUse, Segment, segments


@dataclass(frozen=True)
class Packing:
    lengths: tuple[int, ...]  # every sequence's tokens in this step, in packing order
    caches: tuple[CacheUse | None, ...] = ()  # per sequence, how it uses a block cache (empty: none does)

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"a packing needs sequences of at least one token, got {self.lengths}")
        if self.caches and len(self.caches) != len(self.lengths):
            raise ValueError("a packing's caches must name one use (or None) per sequence")

    def cache(self, sequence: int) -> CacheUse | None:
        return self.caches[sequence] if self.caches else None

    def window(self, sequence: int) -> CacheUse | None:
        """The sequence's cache use when it is a window attending to a cache (not a refresh)."""
        use = self.cache(sequence)
        return use if use is not None and not use.refresh else None

    def store_caches(self, layer: int, k: Tensor, v: Tensor) -> None:
        """Every sequence that stores keeps its first `keep` positions of the packed (1, T, ...) K
        and V of `layer` in its block cache, at its canvas positions."""
        for i, (offset, _) in enumerate(self.sequences()):
            use = self.cache(i)
            if use is not None and use.keep and use.cache is not None:
                at = slice(offset, offset + use.keep)
                use.cache.store(layer, k[0, at], v[0, at], at=use.start)

    def segments(self, sequence: int) -> tuple[Segment, ...]:
        """The attention calls of a sequence (`kv_cache.segments`)."""
        return segments(self.cache(sequence), self.lengths[sequence])

    @cached_property
    def masked_keys(self) -> int:
        """The most keys any block-causal (masked) attention call of this step reads (0: none)."""
        return max((s.keys for i in range(len(self.lengths)) for s in self.segments(i) if s.block), default=0)

    @cached_property
    def plain(self) -> bool:
        """Every sequence attends to its own tokens in one unmasked call (no window, no blocks)."""
        return all(
            len(g := self.segments(i)) == 1 and not g[0].block and not self.window(i) for i in range(len(self.lengths))
        )

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """Each sequence's first canvas position (0 unless it is a window)."""
        return tuple(w.start if (w := self.window(i)) else 0 for i in range(len(self.lengths)))

    @cached_property
    def span(self) -> int:
        """The canvas positions any sequence's keys cover (what the rotary tables must reach)."""
        return max(w.length if (w := self.window(i)) else n for i, n in enumerate(self.lengths))

    @classmethod
    def uniform(cls, batch: int, length: int) -> Packing:
        return cls((length,) * batch)

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        """The first packed token of each sequence."""
        out, at = [], 0
        for n in self.lengths:
            out.append(at)
            at += n
        return tuple(out)

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def longest(self) -> int:
        return max(self.lengths)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.lengths)) == 1

    def sequences(self) -> list[tuple[int, int]]:
        """(first packed token, length) of each sequence."""
        return list(zip(self.offsets, self.lengths, strict=True))

    def positions(self, device: torch.device) -> Tensor:
        """Each packed token's position within its own canvas (what rotary rotates by)."""
        return torch.cat(
            [torch.arange(s, s + n, device=device) for s, n in zip(self.starts, self.lengths, strict=True)]
        )
