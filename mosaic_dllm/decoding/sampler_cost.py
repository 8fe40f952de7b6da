"""The sampler's temporary memory per logits row, measured on a few real rows.

A policy reduces each (C, V) logits chunk with the official per-row maths (float64 Gumbel noise,
softmax, sort for top-p, ...). Those temporaries scale with C x V and depend on the settings, so
rather than tabulate them we run the policy's own reduction on `ROWS` rows of random logits under
the live-tensor tracker and divide: bytes per row, exact for the code that will run. The step plan
adds chunk x that to the logits op's workspace.
"""

from __future__ import annotations

import torch

from ..config import BLOCK_FAMILIES, GenerationConfig
from ..memory.accounting import LiveTensorTracker
from . import dream, llada

ROWS = 4


def sampler_row_bytes(
    family: str, cfg: GenerationConfig, vocab: int, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> int:
    """Peak bytes the sampler allocates per logits row, for resolved settings `cfg`."""
    gen = torch.Generator(device=device).manual_seed(0)
    batch = 2 if family in BLOCK_FAMILIES and cfg.cfg_scale > 0 else 1
    logits = torch.randn((batch, ROWS, vocab), generator=gen, device=device).to(dtype)
    # Rows 1..ROWS are skipped: the official noise of rows nobody reads is drawn and dropped mid-take.
    positions = torch.tensor([0, *range(ROWS + 1, 2 * ROWS)], device=device)
    with torch.inference_mode(), LiveTensorTracker() as tracker:
        if family in BLOCK_FAMILIES:
            chunk = llada.cfg_combine(cfg.cfg_scale)(logits)
            canvas = torch.zeros((1, 2 * ROWS), dtype=torch.long, device=device)
            llada.propose(iter([(positions, chunk)]), canvas, vocab, cfg.temperature, cfg.remasking, gen)
        else:
            dream.sample_tokens(
                logits[0],
                cfg.temperature,
                cfg.top_p,
                cfg.top_k,
                gen,
                margin_confidence=cfg.alg == "topk_margin",
                neg_entropy=cfg.alg == "entropy",
            )
    return -(-tracker.timeline.peak // ROWS)
