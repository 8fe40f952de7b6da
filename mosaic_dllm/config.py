"""Generation settings, checked against the model family before any heavy work."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

LLADA_REMASKING = ("low_confidence", "random")
DREAM_ALGS = ("origin", "maskgit_plus", "topk_margin", "entropy")
BLOCK_FAMILIES = ("llada", "llada_moe")  # semi-autoregressive blocks, remasking, CFG


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

    def resolved(self, family: str) -> GenerationConfig:
        """Defaults filled in for `family`, every setting checked; raises GenerationConfigError."""
        cfg = replace(self, steps=self.gen_length if self.steps is None else self.steps)
        blocks = family in BLOCK_FAMILIES
        if blocks:
            cfg = replace(cfg, block_length=cfg.gen_length if cfg.block_length is None else cfg.block_length)
        cfg._check(family, blocks)
        return cfg

    @property
    def num_blocks(self) -> int:
        return self.gen_length // (self.block_length or self.gen_length)

    def _check(self, family: str, blocks: bool) -> None:
        def fail(msg: str) -> None:
            raise GenerationConfigError(msg)

        for name in ("gen_length", "steps") + (("block_length",) if blocks else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                fail(f"{name} must be a positive integer, got {value!r}")
        if self.temperature < 0:
            fail(f"temperature must be >= 0, got {self.temperature}")
        if blocks:
            if self.gen_length % self.block_length:
                fail(f"gen_length ({self.gen_length}) must be divisible by block_length ({self.block_length})")
            if self.steps % self.num_blocks:
                fail(
                    f"steps ({self.steps}) must be divisible by the number of blocks "
                    f"(gen_length / block_length = {self.num_blocks})"
                )
            if self.cfg_scale < 0:
                fail(f"cfg_scale must be >= 0, got {self.cfg_scale}")
            if self.remasking not in LLADA_REMASKING:
                fail(f"remasking must be one of {LLADA_REMASKING}, got {self.remasking!r}")
            dream_only = {
                "alg": self.alg != "origin",
                "alg_temp": self.alg_temp is not None,
                "top_p": self.top_p is not None,
                "top_k": self.top_k is not None,
            }
            if any(dream_only.values()):
                fail(
                    f"{[k for k, v in dream_only.items() if v]} apply to Dream only; {family} uses "
                    "remasking / cfg_scale / block_length"
                )
            return
        if self.block_length not in (None, self.gen_length):
            fail("Dream's official sampler has no blocks: leave block_length unset (or equal to gen_length)")
        if self.cfg_scale:
            fail("cfg_scale applies to LLaDA / LLaDA-MoE; Dream's official sampler has no classifier-free guidance")
        if self.remasking != "low_confidence":
            fail("remasking applies to LLaDA / LLaDA-MoE; Dream uses alg " + str(DREAM_ALGS))
        if self.alg not in DREAM_ALGS:
            fail(f"alg must be one of {DREAM_ALGS}, got {self.alg!r}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            fail(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            fail(f"top_k must be a positive integer, got {self.top_k!r}")
        if self.alg_temp is not None and self.alg_temp < 0:
            fail(f"alg_temp must be >= 0, got {self.alg_temp}")
        if not 0 < self.eps < 1:
            fail(f"eps must be in (0, 1), got {self.eps}")
