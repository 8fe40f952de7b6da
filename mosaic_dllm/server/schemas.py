"""OpenAI request bodies, with the diffusion settings as extra fields; anything unknown is refused."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator

from ..config import FAMILY_NAMES, SETTINGS, Setting


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    include_usage: bool = False
    denoising: bool = Field(False, description="also send one event per denoising step with the current canvas")


class OpenAIFields(BaseModel):
    """OpenAI's own fields both endpoints share (temperature, top_p, seed and max_tokens are settings)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    n: int = Field(1, ge=1, le=1, description="one choice per request")
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

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
            "choices": list(s.choices) or None,
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
