"""OpenAI request bodies, with the diffusion settings as extra fields; anything unknown is refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..config import OFF


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    denoising: bool = Field(False, description="also send one event per denoising step with the current canvas")


class Sampling(BaseModel):
    """Fields both endpoints share: OpenAI's, then the diffusion settings (mosaic's GenerationConfig)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate (the generation length)")
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1, description="null or 1: no top-p (absent: the model's default)")
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    user: str | None = None
    # diffusion settings
    steps: int | None = Field(None, ge=1)
    block_length: int | None = Field(None, ge=1)
    remasking: Literal["low_confidence", "random"] | None = None
    alg: Literal["origin", "maskgit_plus", "topk_margin", "entropy", "confidence_threshold"] | None = None
    alg_temp: float | None = Field(None, ge=0, description="Dream; null or 0: rank positions without sampling")
    top_k: int | None = Field(None, ge=0, description="Dream; null or 0: no top-k (absent: the model's default)")
    cfg_scale: float | None = Field(None, ge=0)
    stop_at_eos: bool | None = None
    # Fast-dLLM's parallel decoding (LLaDA / LLaDA-MoE): approximations of the official sampler
    threshold: float | None = Field(
        None,
        gt=0,
        le=1,
        description="reveal every masked token of the block at or above this confidence (at least one a step); "
        "Fast-dLLM's decoding, an approximation of the official sampler",
    )
    factor: float | None = Field(None, gt=0, description="Fast-dLLM's factor-based variant of threshold")
    cache: Literal["none", "prefix", "dual"] | None = Field(
        None, description="Fast-dLLM's block K/V cache; an approximation of the official sampler"
    )

    def generation_settings(self) -> dict:
        """The GenerationConfig overrides this request sets (None: the model's default). An explicit
        JSON null is the official "off" where that differs from the default (`config.OFF`)."""
        nulls = {k: v for k, v in OFF.items() if k in self.model_fields_set and getattr(self, k) is None}
        return nulls | {k: v for k, v in self._given().items() if k not in nulls}

    def _given(self) -> dict:
        return {
            "gen_length": self.max_tokens,
            "steps": self.steps,
            "block_length": self.block_length,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "remasking": self.remasking,
            "alg": self.alg,
            "alg_temp": self.alg_temp,
            "cfg_scale": self.cfg_scale,
            "seed": self.seed,
            "stop_at_eos": self.stop_at_eos,
            "threshold": self.threshold,
            "factor": self.factor,
            "cache": self.cache,
        }


class CompletionRequest(Sampling):
    prompt: str | list[int]

    @field_validator("prompt")
    @classmethod
    def not_empty(cls, prompt: str | list[int]) -> str | list[int]:
        if (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
            raise ValueError("the prompt is empty")
        return prompt


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "user", "assistant"]
    content: str
    name: str | None = None


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
