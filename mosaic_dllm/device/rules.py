"""What a device's kernels do to a row's bits and to memory, as the planned kernels and the planner
read it: measured per device by `probes.py`, held by a `DeviceProfile` (`profile.py`).

A BLAS picks its kernel, blocking and thread split by the shape of a call, so the same row times
the same weight can round differently in calls of different row counts. A `GemmRule` says which
calls give every row the bits of the official whole-tensor call: any call of at least `min_rows`
rows (`free`), or only calls of one of the `tiles` row counts. The fused attention kernel may
likewise pick its query split and its packing by the query count: an `AttentionRule` says which
query blocks keep each row's bits, and whether the kernel copies K and V inside a call.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..models.groups import BY_NAME, OpGroup
from ..models.spec import QuantScheme

# Row counts a tiled rule may use, smallest first (a power of two each, so that every vector width
# divides a tile's elements).
TILE_CANDIDATES = (16, 64, 256)
# Weights at least this wide run much faster on larger tiles (measured on an AMX CPU: bf16 K = 4096
# at 300 GFLOP/s in 64-row calls, 600 in 256-row ones); narrow ones pay more for padding than they gain.
WIDE_FROM = 1024
# A single row is never trusted to a free rule: BLAS libraries send one-row calls to a GEMV path
# whose rounding can differ at widths the probe does not try (seen: bf16 K = 4096, 4096 columns).
FEWEST_FREE_ROWS = 2


@dataclass(frozen=True)
class GemmRule:
    """Which calls of a GEMM (or a SwiGLU) give each row the bits of the official whole call.

    `free`: every call of at least `min_rows` rows does (fewer rows run zero-padded to `min_rows`).
    Otherwise only calls of exactly one of `tiles` rows do; an empty `tiles` with `free` False
    means no call size was found exact (`exact` False: results within rounding, not bits)."""

    min_rows: int
    free: bool
    tiles: tuple[int, ...] = ()

    @property
    def exact(self) -> bool:
        return self.free or bool(self.tiles)

    @property
    def every_count(self) -> bool:
        """Calls of any row count gave the whole call's bits: code that calls the kernel on
        however many rows it has (the official MoE experts) is matched bit for bit."""
        return self.free and self.min_rows == 1

    def rows_per_call(self, width: int, few_rows: bool = False) -> int | None:
        """Rows per call for a weight of input width `width` (None: the whole chunk in one call);
        `few_rows`: calls that usually hold few rows (the LM head's) take the smallest tile."""
        if self.free:
            return None
        tiles = self.tiles or (64,)
        if few_rows:
            return tiles[0]
        if width >= WIDE_FROM:
            return tiles[-1]
        return min((t for t in tiles if t >= 64), default=tiles[-1])

    def padded_rows(self, width: int, few_rows: bool = False) -> int:
        """Rows of the zero-padded call that a call on fewer rows runs (its workspace)."""
        return self.rows_per_call(width, few_rows) or max(self.min_rows, FEWEST_FREE_ROWS)

    def as_dict(self) -> dict:
        return {"min_rows": self.min_rows, "free": self.free, "tiles": list(self.tiles)}

    @classmethod
    def from_dict(cls, data: dict) -> GemmRule:
        return cls(int(data["min_rows"]), bool(data["free"]), tuple(int(t) for t in data["tiles"]))


@dataclass(frozen=True)
class AttentionRule:
    """Query blocks that keep the fused attention kernel's per-row bits: blocks of at least
    `min_block` queries starting at multiples of `align` (`min_block` 0: no block does, the
    attention group is not chunked); `copies_kv`: a call copies its K and V inside (a repack the
    planner must count)."""

    align: int
    min_block: int
    copies_kv: bool

    def as_dict(self) -> dict:
        return {"align": self.align, "min_block": self.min_block, "copies_kv": self.copies_kv}

    @classmethod
    def from_dict(cls, data: dict) -> AttentionRule:
        return cls(int(data["align"]), int(data["min_block"]), bool(data["copies_kv"]))


# Too long for any sequence: a group with this smallest block is never split.
NEVER_SPLIT = 1 << 40


class KernelRules:
    """The rules one device gives one dtype: what the planned kernels, the trace and the search read."""

    def __init__(self, profile, dtype: torch.dtype):
        self.profile, self.dtype = profile, dtype
        self.device = torch.device(profile.device_type)
        self.attention: AttentionRule = profile.attention_rule(dtype)
        self._groups: dict[str, OpGroup] = dict(BY_NAME)
        if self.attention.min_block:
            self._groups["attention"] = replace(
                BY_NAME["attention"],
                min_chunk=self.attention.min_block,
                align=self.attention.align,
                min_block=self.attention.min_block,
            )
        else:
            self._groups["attention"] = replace(BY_NAME["attention"], min_chunk=NEVER_SPLIT, min_block=NEVER_SPLIT)

    def group(self, name: str) -> OpGroup:
        """The groups table's row `name`, with the attention group's blocks as this device allows."""
        return self._groups[name]

    def gemm(
        self, in_width: int, out_width: int, scheme: QuantScheme | None = None, dtype: torch.dtype | None = None
    ) -> GemmRule:
        """A GEMM's exact calls; `scheme`: the quantized kernel's, for a weight quantized so;
        `dtype`: a call in another dtype than the model's (a router in float32)."""
        return self.profile.gemm_rule(dtype or self.dtype, in_width, out_width, scheme)

    def swiglu(self, width: int, intermediate: int, scheme: QuantScheme | None = None) -> GemmRule:
        return self.profile.swiglu_rule(self.dtype, width, intermediate, scheme)

    def key_copy_bytes(self, keys: int, kv_heads: int, head_dim: int) -> int:
        """What one fused attention call over `keys` keys allocates inside to copy K and V (0 where
        the profile measured no copy)."""
        if not self.attention.copies_kv:
            return 0
        return 2 * keys * kv_heads * head_dim * self.dtype.itemsize
