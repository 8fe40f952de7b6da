"""OpenAI request bodies, with the diffusion settings as extra fields; anything unknown is refused.

OpenAI fields a diffusion sampler cannot honour are accepted at the values that change nothing
(`frequency_penalty` 0, `logprobs` null, ...: what clients such as the openai SDK, LangChain and
lm-eval send by default) and refused with the field named otherwise (`Unsupported`)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from ..config import FAMILY_NAMES, SETTINGS, Setting


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    denoising: bool = Field(False, description="also send one event per denoising step with the current canvas")


class Unsupported(ValueError):
    """An OpenAI field at a value this server cannot honour; `param` names the field."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


# OpenAI fields accepted only at the values that change nothing (what clients send by default).
NEUTRAL = {
    "frequency_penalty": (0, 0.0),
    "presence_penalty": (0, 0.0),
    "logprobs": (False, 0),
    "top_logprobs": (0,),
    "logit_bias": ({},),
    "best_of": (1,),
    "echo": (False,),
    "suffix": ("",),
}
MAX_STOPS = 4  # as OpenAI


class OpenAIFields(BaseModel):
    """OpenAI's own fields both endpoints share (temperature, top_p, seed and max_tokens are settings)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    n: int = Field(1, ge=1, description="1 only: one choice per request (send several requests with other seeds)")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    stop: str | list[str] | None = Field(None, description="cut the answer before the first of these strings")
    frequency_penalty: float | None = Field(None, description="0 or null only (no penalties in diffusion decoding)")
    presence_penalty: float | None = Field(None, description="0 or null only")
    logit_bias: dict[str, float] | None = Field(None, description="{} or null only")
    top_logprobs: int | None = Field(None, description="0 or null only")

    @model_validator(mode="after")
    def stream_options_need_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options applies to streamed responses: set stream to true, or drop it")
        return self

    def unsupported(self) -> Unsupported | None:
        """The first OpenAI field set to a value that would change the answer, which this server
        cannot honour (None: every field is honoured or neutral)."""
        if self.n != 1:
            return Unsupported("n", f"n {self.n}: one choice per request; send {self.n} requests with different seeds")
        for name, neutral in NEUTRAL.items():
            value = getattr(self, name, None)
            if value is not None and not any(value == v and type(value) is type(v) for v in neutral):
                allowed = f"null or {json.dumps(neutral[0])}"
                return Unsupported(
                    name, f"{name} {json.dumps(value)} is not supported by diffusion decoding; send {allowed}"
                )
        return None

    def stops(self) -> list[str]:
        """The stop strings (OpenAI: up to 4)."""
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOPS or not all(stops):
            raise Unsupported("stop", f"stop takes up to {MAX_STOPS} non-empty strings, got {self.stop!r}")
        return stops

    def generation_settings(self) -> dict:
        """The GenerationConfig overrides this request sets (None: the model's default). An explicit
        JSON null is the official "off" where that differs from the default (`Setting.off`)."""
        out = {}
        for name, s in SETTINGS.items():
            value = getattr(self, s.field_name)
            if value is None and s.off is not None and s.field_name in self.model_fields_set:
                value = s.off
            out[name] = value
        return out


def _field(s: Setting) -> tuple[Any, Any]:
    """A request field for a generation setting: its type, bounds and description from config.SETTINGS."""
    kind = Literal[s.choices] if s.choices else s.kind
    number = int if s.kind is int else float
    bounds = {}
    if s.low is not None:
        bounds["gt" if s.low_open else "ge"] = number(s.low)
    if s.high is not None:
        bounds["lt" if s.high_open else "le"] = number(s.high)
    readers = "" if len(s.families) == len(FAMILY_NAMES) else f" ({' / '.join(FAMILY_NAMES[f] for f in s.families)})"
    off = "" if s.off is None else f"; null: {s.off!r} (off); absent: the model's default"
    return kind | None, Field(None, description=f"{s.help}{readers}; {s.describe()}{off}", **bounds)


def page_settings(family: str) -> list[dict]:
    """The settings a `family`'s sampler reads, as the live page builds its fields from them."""
    return [
        {
            "name": s.field_name,
            "kind": s.kind.__name__,
            "choices": list(s.choices_for(family)) or None,
            "low": s.low,
            "high": s.high,
            "help": f"{s.help}; {s.describe()}",
        }
        for s in SETTINGS.values()
        if family in s.families
    ]


# OpenAI's fields, then one per generation setting (mosaic's GenerationConfig), in its order.
Sampling = create_model("Sampling", __base__=OpenAIFields, **{s.field_name: _field(s) for s in SETTINGS.values()})


class CompletionRequest(Sampling):
    prompt: str | list[int]
    logprobs: int | None = Field(None, description="0 or null only (no log-probabilities in diffusion decoding)")
    best_of: int | None = Field(None, description="1 or null only")
    echo: bool | None = Field(None, description="false or null only")
    suffix: str | None = Field(None, description="empty or null only (no insertion after the answer)")

    @field_validator("prompt")
    @classmethod
    def not_empty(cls, prompt: str | list[int]) -> str | list[int]:
        if (isinstance(prompt, str) and not prompt.strip()) or (isinstance(prompt, list) and not prompt):
            raise ValueError("the prompt is empty")
        return prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it: `developer` is the system role of newer
        clients; text parts joined by newlines (text is the only part a language model reads)."""
        content = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content}
        return message | ({"name": self.name} if self.name is not None else {})


class ChatCompletionRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    logprobs: bool | None = Field(None, description="false or null only (no log-probabilities in diffusion decoding)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")

    def generation_settings(self) -> dict:
        settings = super().generation_settings()
        if self.max_completion_tokens is not None:
            if self.max_tokens not in (None, self.max_completion_tokens):
                raise Unsupported(
                    "max_completion_tokens",
                    f"max_completion_tokens ({self.max_completion_tokens}) and max_tokens ({self.max_tokens}) "
                    "disagree: send one",
                )
            settings["gen_length"] = self.max_completion_tokens
        return settings
