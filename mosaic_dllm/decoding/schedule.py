"""How many tokens each denoising step reveals, as the official samplers count them."""

from __future__ import annotations

import torch


def llada_transfer_counts(block_mask: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, block) masked flags -> (B, steps) counts: n // steps each, the first n % steps one more.

    12 masked tokens in 5 steps: 3, 3, 2, 2, 2.
    """
    n = block_mask.sum(dim=1, keepdim=True)
    counts = torch.zeros(n.size(0), steps, device=block_mask.device, dtype=torch.int64) + n // steps
    for row, extra in enumerate((n % steps).flatten().tolist()):
        counts[row, :extra] += 1
    return counts


def dream_timesteps(steps: int, eps: float, device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.linspace(1, eps, steps + 1, device=device)


def dream_transfer_count(mask_index: torch.Tensor, step: int, steps: int, timesteps: torch.Tensor) -> int:
    """int(n_masked * (1 - s / t)), n_masked averaged over the batch; everything left at the last step."""
    n = mask_index.sum() / mask_index.shape[0]
    if step == steps - 1:
        return int(n)
    t, s = timesteps[step], timesteps[step + 1]
    return int(n * (1 - s / t))
