"""Linear weights held in int8 or int4, multiplied by PyTorch's own weight-only kernels.

A `QuantizedWeight` stands where a (N, K) weight tensor stands in `Weights`: it has the weight's
shape and compute dtype, and `linear(x, bias)` computes x @ W.T (+ bias) from the packed weight.
Two schemes (`spec.QuantScheme`):

- int8, one float scale per output channel, symmetric: W ~ q * scale, q in [-127, 127];
- int4 in groups of `group` input columns, a scale and a zero point per group (PyTorch's tinygemm
  convention): W ~ (q - 8) * scale + zero, q in [0, 15].

On CPU the kernels are `aten._weight_int8pack_mm` and `aten._weight_int4pack_mm_for_cpu` (the
weight stays packed; the output is a fresh tensor). Elsewhere a call dequantizes the weight into a
temporary and runs `F.linear` (`kernel_of`); either way what a call allocates is
`call_workspace`. Quantization is an approximation: the loss is measured, never assumed
(`benchmarks/quantization.py`, `tests/test_quantization.py`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import Tensor

from .spec import ArchSpec, ConfigError, QuantScheme
from .weights import (
    Weights,
    expected_shapes,
    from_state_dict,
    linear_names,
    optional_names,
    row_sharded_names,
    unfused,
)

GROUPS = (32, 64, 128)
# The int4 CPU packing wants output rows in multiples of 16: narrower weights are padded with zero rows.
INT4_ROW_MULTIPLE = 16
# Rows per call of a quantized GEMM in the planned kernels: a call's output is a fresh tensor, so
# the rows of one call bound what it allocates (`call_workspace`).
QUANTIZED_CALL_ROWS = 256
EMBEDDINGS = QuantScheme(8)  # an embedding table quantized: int8, one scale per token row
INT4_BLOCKS = QuantScheme(4, 32)  # llama.cpp's Q4_0 / Q4_K blocks, held as they are (`gguf_file.py`)


class QuantizationError(ConfigError):
    """A quantization was asked for that the model's shapes or the scheme's name do not allow."""


def parse_quantization(name: str | None, head: bool = False, embeddings: bool = False) -> QuantScheme | None:
    """'int8', 'int4' (groups of 32, llama.cpp's Q4 block), 'int4-g32|g64|g128'; None / 'none': unquantized."""
    if name is None or name.lower() in ("none", ""):
        if head or embeddings:
            raise QuantizationError("quantize_head / quantize_embeddings need a quantization (int8 or int4)")
        return None
    text = name.lower()
    if text == "int8":
        return QuantScheme(8, 0, head, embeddings)
    if text == "int4":
        return QuantScheme(4, GROUPS[0], head, embeddings)
    if text.startswith("int4-g") and text[6:].isdigit() and int(text[6:]) in GROUPS:
        return QuantScheme(4, int(text[6:]), head, embeddings)
    raise QuantizationError(
        f"unknown quantization {name!r}; accepted: none, int8, int4 (= int4-g32), "
        + ", ".join(f"int4-g{g}" for g in GROUPS)
    )


def quantized_names(spec: ArchSpec, scheme: QuantScheme) -> set[str]:
    """The official names of the tensors `scheme` quantizes as they load: every linear layer's
    weight, the experts' too, and an untied LM head when `scheme.head` (a tied one is the
    embedding table, which stays as it is: the head gets its own quantized copy)."""
    return linear_names(spec, head=scheme.head)


def check_shapes(spec: ArchSpec, scheme: QuantScheme) -> None:
    """Refuse, before loading, a group that does not divide some linear weight's input width."""
    if scheme.bits != 4:
        return
    shapes = expected_shapes(spec)
    bad = sorted({shapes[n][1] for n in quantized_names(spec, scheme) if shapes[n][1] % scheme.group})
    if bad:
        fits = [f"int4-g{g}" for g in GROUPS if all(w % g == 0 for w in bad)]
        raise QuantizationError(
            f"{scheme.name} needs every linear layer's input width to be a multiple of {scheme.group}; "
            f"this model has widths {bad}" + (f": use {' or '.join(fits)}" if fits else ": use int8")
        )


class QuantizedWeight:
    """A (N, K) linear weight held quantized; `linear` multiplies by it in its compute dtype.

    int4 weights on CPU are held in the CPU kernel's packing (N padded to 16 rows); elsewhere as
    plain nibbles, two per byte (even column in the low nibble), dequantized per call."""

    def __init__(self, scheme: QuantScheme, shape: tuple[int, int], dtype: torch.dtype, data: Tensor, scales: Tensor):
        self.scheme, self.shape, self.dtype = scheme, torch.Size(shape), dtype
        self.data = data  # int8 (N, K) | int4: uint8 (N padded, K / 2), CPU-packed or nibbles
        self.scales = scales  # int8: (N,) in `dtype`; int4: (K / group, N padded, 2) scale and zero in `dtype`

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes

    def element_size(self) -> int:
        return self.dtype.itemsize

    def __repr__(self) -> str:
        return f"QuantizedWeight({self.scheme.name}, {tuple(self.shape)}, {self.dtype}, {self.device})"

    @classmethod
    def meta(cls, scheme: QuantScheme, shape: tuple[int, int], dtype: torch.dtype) -> QuantizedWeight:
        """Shapes only (the planner's trace)."""
        n, k = shape
        meta = torch.device("meta")
        if scheme.bits == 8:
            return cls(
                scheme,
                shape,
                dtype,
                torch.empty(shape, dtype=torch.int8, device=meta),
                torch.empty((n,), dtype=dtype, device=meta),
            )
        rows = _padded_rows(n)
        data = torch.empty((rows, k // 2), dtype=torch.uint8, device=meta)
        return cls(scheme, shape, dtype, data, torch.empty((k // scheme.group, rows, 2), dtype=dtype, device=meta))

    def dequantize(self) -> Tensor:
        """The (N, K) weight the kernels multiply by, in the compute dtype."""
        n, k = self.shape
        if self.scheme.bits == 8:
            return (self.data.float() * self.scales.float()[:, None]).to(self.dtype)
        if kernel_of(self.device) == "packed":  # the CPU packing, read back through its kernel: I @ W.T
            eye = torch.eye(k, dtype=self.dtype, device=self.device)
            return torch.cat([self._int4(eye[s : s + 256]) for s in range(0, k, 256)]).t().contiguous()
        q = torch.stack((self.data & 0x0F, self.data >> 4), dim=-1).view(-1, k)[:n].float()
        scale, zero = (self.scales[..., j].float().t()[:n] for j in (0, 1))  # (N, K / group)
        w = (q.view(n, -1, self.scheme.group) - 8) * scale[..., None] + zero[..., None]
        return w.view(n, k).to(self.dtype)

    def linear(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        """x (..., K) @ W.T (+ bias) as a fresh (..., N) tensor in x's dtype."""
        flat = x.reshape(-1, self.shape[1])
        if kernel_of(x.device) != "packed":
            out = F.linear(flat, self.dequantize())
        elif self.scheme.bits == 8:
            out = torch.ops.aten._weight_int8pack_mm(flat, self.data, self.scales)
        else:
            out = self._int4(flat)
        if bias is not None:
            out = out.add_(bias)
        return out.view(*x.shape[:-1], self.shape[0])

    def rows(self, ids: Tensor, out: Tensor | None = None) -> Tensor:
        """An int8 table's rows `ids` in the compute dtype (an embedding lookup), into `out` if given;
        what it allocates besides is `rows_workspace`."""
        codes = self.data.index_select(0, ids.reshape(-1))
        scales = self.scales.index_select(0, ids.reshape(-1))[:, None]
        rows = torch.mul(codes, scales, out=out.view(-1, self.shape[1]) if out is not None else None)
        return rows.view(*ids.shape, self.shape[1])

    def rows_workspace(self, count: int) -> int:
        return count * (self.shape[1] + self.dtype.itemsize)

    def _int4(self, flat: Tensor) -> Tensor:
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.data, self.scheme.group, self.scales)
        return out if out.shape[1] == self.shape[0] else out[:, : self.shape[0]].contiguous()

    def call_workspace(self, rows: int) -> int:
        """Bytes one call on `rows` rows allocates besides its caller's output: the kernel's fresh
        output (int4's with its padded columns), and off CPU the dequantized weight."""
        n, k = self.shape
        out = rows * (_padded_rows(n) if self.scheme.bits == 4 else n) * self.dtype.itemsize
        dequantized = 0 if kernel_of(self.device) == "packed" else n * k * self.dtype.itemsize
        return out + dequantized


def kernel_of(device: torch.device) -> str:
    """'packed' (PyTorch's CPU weight-only kernels read the packed weight; the planner's meta
    device plans for them) or 'dequantize' (a temporary dequantized weight per call: CUDA, untested here)."""
    return "packed" if device.type in ("cpu", "meta") else "dequantize"


def _padded_rows(n: int) -> int:
    return math.ceil(n / INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE


def quantize(weight: Tensor, scheme: QuantScheme) -> QuantizedWeight:
    """Quantize a (N, K) weight (statistics in float32 on CPU: the same codes on every device),
    for compute in the weight's dtype, on its device."""
    dtype, device = weight.dtype, weight.device
    w = weight.detach().to("cpu", torch.float32)
    n, k = w.shape
    if scheme.bits == 8:
        scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
        q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
        return QuantizedWeight(scheme, (n, k), dtype, q.to(device), scale.to(device, dtype))
    q, scale, zero = int4_codes(w, scheme.group)
    return from_int4(scheme, q, scale, zero, dtype, device)


def int4_codes(w: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(N, K) float32 -> nibbles (N, K) in [0, 15] and per-group (N, K / group) scale and zero,
    W ~ (q - 8) * scale + zero (min-max per group)."""
    n, k = w.shape
    if k % group:
        raise QuantizationError(f"int4 groups of {group} do not divide an input width of {k}")
    groups = w.view(n, k // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.int32).view(n, k)
    return q, scale, low + 8 * scale


def from_int4(
    scheme: QuantScheme, q: Tensor, scale: Tensor, zero: Tensor, dtype: torch.dtype, device: torch.device
) -> QuantizedWeight:
    """(N, K) nibbles in [0, 15] with per-group (N, K / group) scale and zero, W = (q - 8) * scale + zero,
    laid out for `device` (GGUF's Q4_0 and Q4_K blocks load through here as they are)."""
    n, k = q.shape
    rows = _padded_rows(n)
    if rows != n:
        q = torch.cat((q, torch.full((rows - n, k), 8, dtype=q.dtype)))
        scale, zero = (torch.cat((t, t.new_zeros(rows - n, t.shape[1]))) for t in (scale, zero))
    scales = torch.stack((scale, zero), dim=-1).transpose(0, 1).contiguous().to(dtype)
    if kernel_of(device) == "packed":
        data = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
    else:
        pairs = q.to(torch.uint8).view(rows, k // 2, 2)
        data = pairs[..., 0] | (pairs[..., 1] << 4)
    return QuantizedWeight(scheme, (n, k), dtype, data.to(device), scales.to(device))


def linear(x: Tensor, weight: Tensor | QuantizedWeight, bias: Tensor | None = None) -> Tensor:
    """F.linear, or the quantized kernel for a `QuantizedWeight`: what every kernel multiplies with."""
    if isinstance(weight, QuantizedWeight):
        return weight.linear(x, bias)
    return F.linear(x, weight, bias)


def weight_bytes(spec: ArchSpec, dtype: torch.dtype, kept_int4: Collection[str] = (), tensor_ranks: int = 1) -> int:
    """The bytes the weights take as loaded, from shapes alone (quantized ones as packed, with
    scales); `kept_int4`: names a GGUF file holds in int4 blocks, whatever `spec.quantization` says;
    `tensor_ranks`: one tensor-parallel rank's (its rows of every row-split tensor, a tied head's
    own rows besides the whole table)."""
    shapes = expected_shapes(spec) | optional_names(spec)  # an absent expert bias loads as zeros
    quantized = quantized_names(spec, spec.quantization) if spec.quantization else set()
    split = row_sharded_names(spec) if tensor_ranks > 1 else set()
    total = 0
    if tensor_ranks > 1 and spec.tie_word_embeddings:
        total += spec.vocab_size // tensor_ranks * spec.hidden_size * dtype.itemsize
    for name, shape in shapes.items():
        if name in split:
            total += math.prod(shape) // tensor_ranks * dtype.itemsize
        elif name in kept_int4:
            total += quantized_bytes(INT4_BLOCKS, shape, dtype)
        elif name in quantized:
            total += quantized_bytes(spec.quantization, shape, dtype)
        else:
            total += math.prod(shape) * dtype.itemsize
    return total + extra_bytes(spec, spec.quantization, dtype)


def extra_bytes(spec: ArchSpec, scheme: QuantScheme | None, dtype: torch.dtype) -> int:
    """What `scheme` changes beyond the linear weights: an int8 embedding table instead of the
    compute dtype's, and a tied head's own quantized copy."""
    if scheme is None:
        return 0
    table = (spec.vocab_size, spec.hidden_size)
    total = 0
    if scheme.embeddings:
        total += quantized_bytes(EMBEDDINGS, table, dtype)
        if not spec.tie_word_embeddings or scheme.head:  # else the unquantized head keeps the table
            total -= math.prod(table) * dtype.itemsize
    if scheme.head and spec.tie_word_embeddings:
        total += quantized_bytes(scheme, table, dtype)
    return total


Quantize = Callable[[Tensor, QuantScheme], "QuantizedWeight"]


def quantize_table(weights: Weights, scheme: QuantScheme | None, make: Quantize | None = None) -> None:
    """After loading: the embedding table as int8 rows (`scheme.embeddings`), and a tied head's own
    quantized copy (`scheme.head`), the table being both. `make`: how a tensor is quantized
    (default `quantize`; the planner's trace makes shapes-only ones)."""
    make = make or quantize
    if scheme is None:
        return
    if scheme.head and weights.lm_head is weights.embed:
        weights.lm_head = make(weights.lm_head, scheme)
    if scheme.embeddings:
        weights.embed = make(weights.embed, EMBEDDINGS)


def quantized_weights(spec: ArchSpec, state: dict[str, Tensor], make: Quantize | None = None) -> Weights:
    """Weights from a whole state dict, quantized as `spec.quantization` says (random or shapes-only
    weights: a checkpoint quantizes tensor by tensor as it reads them)."""
    scheme, make, state = spec.quantization, make or quantize, unfused(spec, state)
    if scheme is not None:
        state = state | {name: make(state[name], scheme) for name in quantized_names(spec, scheme)}
    weights = from_state_dict(spec, state)
    quantize_table(weights, scheme, make)
    return weights


def quantized_bytes(scheme: QuantScheme, shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """A (N, K) weight quantized by `scheme`, with its scales in `dtype`."""
    n, k = shape
    if scheme.bits == 8:
        return n * k + n * dtype.itemsize
    rows = _padded_rows(n)  # int4: packed codes, a scale and a zero per group, rows padded
    return rows * k // 2 + (k // scheme.group) * rows * 2 * dtype.itemsize
