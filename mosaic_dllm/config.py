"""Generation settings as a caller gives them: a field left None is unset, and the family's sampler
fills it the way the family's official entry point would (`Sampler.resolve`, decoding/), then
checks every setting before any heavy work. Here only what holds for every family."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any

# No sequence dimension beyond this (2**24 tokens): larger values are typing accidents or attacks.
MAX_LENGTH = 1 << 24


NUMBERS = ("temperature", "cfg_scale", "alg_temp", "top_p", "eps", "threshold", "factor")
CACHES = ("none", "prefix", "dual")
INTEGERS = ("gen_length", "steps", "block_length", "top_k", "seed")
# The official code's None ("off") where it differs from unset (our None): no top-k, no top-p, ranking
# positions without sampling. A family without the setting accepts its off value as a no-op.
OFF = {"top_k": 0, "top_p": 1.0, "alg_temp": 0.0}


class GenerationConfigError(ValueError):
    """Generation settings that cannot run (names the setting and the accepted values)."""


@dataclass(frozen=True)
class GenerationConfig:
    gen_length: int | None = None  # tokens to generate
    steps: int | None = None  # denoising steps
    block_length: int | None = None  # LLaDA / LLaDA-MoE semi-autoregressive block
    temperature: float | None = None
    cfg_scale: float | None = None  # LLaDA / LLaDA-MoE classifier-free guidance
    remasking: str | None = None  # LLaDA / LLaDA-MoE: low_confidence | random
    alg: str | None = None  # Dream: origin | maskgit_plus | topk_margin | entropy
    alg_temp: float | None = None  # Dream: sample positions instead of top-k
    top_p: float | None = None  # Dream
    top_k: int | None = None  # Dream
    eps: float | None = None  # Dream: final timestep
    # Fast-dLLM's parallel decoding (opt-in; approximations of the official sampler, exact to Fast-dLLM):
    threshold: float | None = None  # reveal every masked position of the block above this confidence
    factor: float | None = None  # Fast-dLLM's factor-based variant of the threshold
    cache: str | None = None  # none | prefix | dual: Fast-dLLM's block K/V caches
    seed: int | None = 0
    stop_at_eos: bool = False  # finish once the text before the first EOS can no longer change

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise GenerationConfigError(f"unknown generation settings {unknown}; accepted: {sorted(known)}")
        return cls(**values)

    @property
    def num_blocks(self) -> int:
        return self.gen_length // (self.block_length or self.gen_length)

    @property
    def parallel(self) -> bool:
        """Fast-dLLM's decoding (threshold, factor or a block cache) rather than the official sampler."""
        return self.threshold is not None or self.factor is not None or self.cache not in (None, "none")

    @property
    def most_steps(self) -> int:
        """The steps a generation can take: `steps`, or with a threshold (or factor) one token a step."""
        return self.gen_length if self.threshold is not None or self.factor is not None else self.steps

    def unset(self, **defaults: Any) -> GenerationConfig:
        """The settings with every unset (None) field in `defaults` filled from it."""
        return replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def given(self) -> dict[str, Any]:
        """The settings the caller set."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None}

    def check_common(self, *positive: str) -> None:
        """Settings every sampler needs: `positive` (and gen_length, steps) positive integers, a
        temperature >= 0, every number finite and of its type, a seed a generator accepts;
        raises GenerationConfigError."""
        for name in NUMBERS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
                raise GenerationConfigError(f"{name} must be a number, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                raise GenerationConfigError(f"{name} must be a finite number, got {value!r}")
        for name in INTEGERS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise GenerationConfigError(f"{name} must be an integer, got {value!r}")
        if not isinstance(self.stop_at_eos, bool):
            raise GenerationConfigError(f"stop_at_eos must be true or false, got {self.stop_at_eos!r}")
        for name in ("gen_length", "steps", *positive):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GenerationConfigError(f"{name} must be a positive integer, got {value!r}")
            if value > MAX_LENGTH:
                raise GenerationConfigError(f"{name} must be at most {MAX_LENGTH}, got {value}")
        if self.temperature < 0:
            raise GenerationConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise GenerationConfigError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.factor is not None and self.factor <= 0:
            raise GenerationConfigError(f"factor must be > 0, got {self.factor}")
        if self.threshold is not None and self.factor is not None:
            raise GenerationConfigError(
                "set threshold or factor, not both (factor is Fast-dLLM's variant of threshold)"
            )
        if self.cache is not None and self.cache not in CACHES:
            raise GenerationConfigError(f"cache must be one of {CACHES}, got {self.cache!r}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise GenerationConfigError(f"seed must be in [0, 2**63), got {self.seed}")
