"""Generation settings. What each family's sampler accepts is checked by the sampler
(`decoding/`, `Sampler.resolve`) before any heavy work; here only what holds for every family."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


class GenerationConfigError(ValueError):
    """Generation settings that cannot run (names the setting and the accepted values)."""


@dataclass(frozen=True)
class GenerationConfig:
    gen_length: int = 128
    steps: int | None = None  # default: gen_length (one token per step)
    block_length: int | None = None  # LLaDA / LLaDA-MoE; default: gen_length (one block)
    temperature: float = 0.0
    cfg_scale: float = 0.0  # LLaDA / LLaDA-MoE classifier-free guidance
    remasking: str = "low_confidence"  # LLaDA / LLaDA-MoE
    alg: str = "origin"  # Dream
    alg_temp: float | None = None  # Dream: sample positions instead of top-k
    top_p: float | None = None  # Dream
    top_k: int | None = None  # Dream
    eps: float = 1e-3  # Dream: final timestep
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

    def check_common(self, *positive: str) -> None:
        """Settings every sampler needs: `positive` (and gen_length, steps) positive integers, a
        temperature >= 0; raises GenerationConfigError."""
        for name in ("gen_length", "steps", *positive):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise GenerationConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.temperature < 0:
            raise GenerationConfigError(f"temperature must be >= 0, got {self.temperature}")
