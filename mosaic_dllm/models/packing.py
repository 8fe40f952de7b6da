"""Sequences packed one after another along the token dimension: how a batched step is laid out.

Token-local ops (norms, projections, FFN, MoE, the LM head) see one (1, T, ...) tensor of every
sequence's tokens; rotary and attention run per sequence (no padding, no attention across
sequences). A request contributes one sequence, two with classifier-free guidance (conditional
then unconditional, adjacent). One request alone is a packing too: its B sequences in canvas order,
which is exactly the (B, L) layout the official code flattens.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor


@dataclass(frozen=True)
class Packing:
    lengths: tuple[int, ...]  # every sequence's length, in packing order

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise ValueError(f"a packing needs sequences of at least one token, got {self.lengths}")

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
        """Each packed token's position within its own sequence (what rotary rotates by)."""
        return torch.cat([torch.arange(n, device=device) for n in self.lengths])
