"""What every denoising loop shares: the model call it makes, step events, the EOS completion test."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class StepEvent:
    step: int  # 1-based, over the whole generation
    total_steps: int
    block: int  # 0-based block index (always 0 for Dream)
    canvas: Tensor  # (L,) current tokens, prompt included; masked positions hold mask_token_id
    prompt_length: int
    mask_token_id: int
    revealed: int  # tokens revealed at this step


# Returns False to cancel the generation after this step.
StepCallback = Callable[[StepEvent], bool | None]


class GenerationCancelled(RuntimeError):
    """A step callback asked to stop (for example, the client went away)."""


@dataclass
class DenoiseResult:
    canvas: Tensor  # (L,) final tokens
    forward_passes: int
    steps_run: int
    stopped_at_eos: bool


def initial_canvas(prompt: Tensor, gen_length: int, mask_id: int) -> Tensor:
    """(1, P + gen_length): the prompt followed by mask tokens."""
    x = torch.full((1, prompt.numel() + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[0, : prompt.numel()] = prompt
    return x


def first_eos(tokens: Tensor, eos_ids: tuple[int, ...]) -> int | None:
    hits = torch.isin(tokens, torch.tensor(eos_ids, device=tokens.device)).nonzero()
    return int(hits[0]) if hits.numel() else None


def answer_complete(canvas: Tensor, prompt_length: int, mask_id: int, eos_ids: tuple[int, ...]) -> bool:
    """True when an EOS is revealed and every generated position before it is revealed too.

    Revealed tokens are never re-masked, so the text before that EOS can no longer change.
    """
    gen = canvas[prompt_length:]
    revealed_eos = torch.isin(gen, torch.tensor(eos_ids, device=gen.device)).nonzero()
    if not revealed_eos.numel():
        return False
    return not bool((gen[: int(revealed_eos[0])] == mask_id).any())


def notify(callback: StepCallback | None, event: StepEvent) -> None:
    if callback is not None and callback(event) is False:
        raise GenerationCancelled(f"generation cancelled by the step callback at step {event.step}")
