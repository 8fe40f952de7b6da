"""The official samplers, one per family, behind one `Sampler` protocol (`common.py`)."""

from __future__ import annotations

from ..models.spec import ArchSpec
from .common import Sampler
from .dream import DreamSampler
from .llada import LLaDASampler
from .llada2 import LLaDA2Sampler
from .sdar import SDARSampler

SAMPLERS = {
    "llada": LLaDASampler,
    "llada_moe": LLaDASampler,
    "dream": DreamSampler,
    "sdar": SDARSampler,
    "llada2": LLaDA2Sampler,
}


def sampler_for(
    spec: ArchSpec,
    model_config: dict | None = None,
    generation_config: dict | None = None,
    vocabulary: dict[str, int] | None = None,
) -> Sampler:
    """The official sampler of `spec`'s family; it takes its defaults for unset settings from the
    checkpoint's config.json and generation_config.json as the family's official code would, and
    special tokens it names from the tokenizer's `vocabulary` (special token -> id)."""
    return SAMPLERS[spec.family](spec, model_config, generation_config, vocabulary)


__all__ = ["SAMPLERS", "DreamSampler", "LLaDA2Sampler", "LLaDASampler", "SDARSampler", "Sampler", "sampler_for"]
