"""The official samplers, one per family, behind one `Sampler` protocol (`common.py`)."""

from __future__ import annotations

from ..models.spec import ArchSpec
from .common import Sampler
from .dream import DreamSampler
from .llada import LLaDASampler

SAMPLERS = {"llada": LLaDASampler, "llada_moe": LLaDASampler, "dream": DreamSampler}


def sampler_for(spec: ArchSpec) -> Sampler:
    """The official sampler of `spec`'s family."""
    return SAMPLERS[spec.family](spec)


__all__ = ["SAMPLERS", "DreamSampler", "LLaDASampler", "Sampler", "sampler_for"]
