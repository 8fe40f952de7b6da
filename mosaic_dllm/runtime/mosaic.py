"""The Mosaic executor: the same model description, with logits only for the rows a sampler reads.

The network body runs as in the eager executor (planned buffers and chunking plug in here later);
the final hidden states are kept, and the LM head runs over the requested rows in chunks of
`row_chunk`, each written into one reused buffer, so no tensor of size L x V ever exists.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..models import transformer
from ..models.spec import ArchSpec
from ..models.weights import Weights
from .eager import EagerOps

DEFAULT_ROW_CHUNK = 64


class MosaicExecutor:
    name = "mosaic"
    mask_only = True

    def __init__(self, spec: ArchSpec, weights: Weights, row_chunk: int = DEFAULT_ROW_CHUNK):
        if row_chunk < 1:
            raise ValueError(f"row_chunk must be >= 1, got {row_chunk}")
        self.spec, self.weights, self.ops, self.row_chunk = spec, weights, EagerOps(), row_chunk

    @torch.inference_mode()
    def hidden(self, ids: Tensor) -> Tensor:
        """(B, L) ids -> (B, L, H) final (normalised) hidden states."""
        return transformer.hidden_states(self.ops, self.spec, self.weights, ids)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights.embed.dtype

    @torch.inference_mode()
    def row_logits(self, hidden: Tensor, rows: Tensor) -> Iterator[tuple[slice, Tensor]]:
        """Yield (slice of `rows`, (B, C, V) logits) for hidden-state rows `rows`, chunk by chunk.

        The yielded logits live in a buffer reused by the next chunk: consume them before advancing.
        """
        head = self.weights.lm_head
        buffer = None
        for start in range(0, rows.numel(), self.row_chunk):
            chunk = rows[start : start + self.row_chunk]
            h = hidden[:, chunk]  # (B, C, H): a gathered copy of one chunk only
            shape = (hidden.shape[0], chunk.numel(), head.shape[0])
            if buffer is None or buffer.numel() < torch.Size(shape).numel():
                buffer = torch.empty(shape, dtype=hidden.dtype, device=hidden.device)
            out = buffer.view(-1)[: torch.Size(shape).numel()].view(shape)
            torch.matmul(h, head.t(), out=out)
            yield slice(start, start + chunk.numel()), out
