"""The sampler's temporary memory per logits row, measured on a few real rows.

A sampler reduces each (C, V) logits chunk with the official per-row maths (float64 Gumbel noise,
softmax, sort for top-p, ...). Those temporaries scale with C x V and depend on the settings, so
rather than tabulate them we run the sampler's own reduction on `ROWS` rows of random logits under
the live-tensor tracker and divide: bytes per row, exact for the code that will run. The step plan
adds chunk x that to the logits op's workspace.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..memory.accounting import LiveTensorTracker
from ..memory.sizes import ceil_div

ROWS = 4
# A reduction of one chunk: (positions (ROWS,), logits (B, ROWS, V), canvas length, generator).
Reduction = Callable[[Tensor, Tensor, int, torch.Generator], object]


def measure_row_bytes(
    reduce: Reduction, batch: int, vocab: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> int:
    """Peak bytes `reduce` allocates per logits row."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn((batch, ROWS, vocab), generator=gen, device=device).to(dtype)
    # Rows 1..ROWS are skipped: the official noise of rows nobody reads is drawn and dropped mid-take.
    positions = torch.tensor([0, *range(ROWS + 1, 2 * ROWS)], device=device)
    with torch.inference_mode(), LiveTensorTracker() as tracker:
        reduce(positions, logits, 2 * ROWS, gen)
    return ceil_div(tracker.timeline.peak, ROWS)
