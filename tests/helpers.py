"""Small helpers the tests share."""

import torch


def joined(chunks) -> torch.Tensor:
    """An executor's row-logits chunks ((rows, (B, C, V) logits), ...) as one (B, rows, V) tensor;
    each chunk copied before the next overwrites its planned buffer."""
    return torch.cat([logits.clone() for _, logits in chunks], dim=1)
