"""OpenAI's response, chunk and error objects for one request."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..decoding.common import StepEvent
from ..engine import GenerationOutput

MASK_MARKER = "\u2591"  # light shade: one per masked position in denoising events


def error_body(message: str, code: str, kind: str = "invalid_request_error", param: str | None = None, **extra) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code} | extra}


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first occurrence of any stop string, and whether one occurred (OpenAI's
    `stop`: the stop string itself is not returned)."""
    at = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:at], True) if at >= 0 else (text, False)


class Shape:
    """OpenAI response and chunk objects for one request."""

    def __init__(self, rid: str, model: str, chat: bool, stops: list[str] | None = None):
        self.rid, self.model, self.chat, self.created = rid, model, chat, int(time.time())
        self.stops = stops or []
        self.sent = ""  # text a stream has sent so far
        self.settled_tokens = 0  # answer tokens that text was decoded from

    def _base(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(out: GenerationOutput) -> dict:
        n_prompt, n_gen = len(out.prompt_token_ids), out.completion_tokens
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    def answer(self, out: GenerationOutput) -> tuple[str, str]:
        """(text, finish_reason): cut at the first stop string; "stop" at a stop string or an EOS."""
        text, stopped = cut_at_stop(out.text, self.stops)
        return text, "stop" if stopped else out.finish_reason

    def choice(self, out: GenerationOutput, chunk: bool) -> dict:
        """The one choice: a chat message (a delta in a chunk: what the stream has not sent) or a
        completion's text."""
        text, finish = self.answer(out)
        if chunk and text.startswith(self.sent):
            text = text[len(self.sent) :]
        return self._text_choice(text, chunk) | {"finish_reason": finish}

    def _text_choice(self, text: str, chunk: bool) -> dict:
        if self.chat:
            return {"index": 0, "delta" if chunk else "message": {"role": "assistant", "content": text}}
        return {"index": 0, "text": text, "logprobs": None}

    def settled_chunk(
        self, event: StepEvent, decode: Callable[[list[int]], str], eos_ids: tuple[int, ...]
    ) -> dict | None:
        """A chunk of the text that can no longer change and was not sent yet: the answer's tokens
        before its first masked position (revealed tokens never change; a block-diffusion model
        settles block by block; one that edits revealed tokens says how many settled), up to an EOS;
        None when nothing new settled. Held back: a partly
        decoded character, and what could still be the start of a stop string."""
        settled = []
        for token in event.canvas[event.prompt_length :][: event.settled].tolist():
            if token == event.mask_token_id or token in eos_ids:
                break
            settled.append(token)
        if len(settled) == self.settled_tokens:  # nothing new: no decoding
            return None
        self.settled_tokens = len(settled)
        text, _ = cut_at_stop(decode(settled).rstrip("\ufffd"), self.stops)
        hold = max((len(s) for s in self.stops), default=1) - 1
        text = text[: len(text) - hold] if hold else text
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return None
        delta, self.sent = text[len(self.sent) :], text
        return self._base(True) | {"choices": [self._text_choice(delta, True) | {"finish_reason": None}]}

    def response(self, out: GenerationOutput) -> dict:
        body = {"choices": [self.choice(out, chunk=False)], "usage": self.usage(out), "settings": out.settings}
        return self._base(False) | body

    def final_chunk(self, out: GenerationOutput) -> dict:
        return self._base(True) | {"choices": [self.choice(out, chunk=True)], "settings": out.settings}

    def usage_chunk(self, out: GenerationOutput) -> dict:
        return self._base(True) | {"choices": [], "usage": self.usage(out)}

    def denoising_chunk(self, event: StepEvent, decode: Callable[[list[int]], str], eos_ids: tuple[int, ...]) -> dict:
        answer = event.canvas[event.prompt_length :].tolist()
        eos = next((i for i, t in enumerate(answer) if t in eos_ids), None)
        answer = answer if eos is None else answer[:eos]  # nothing after a revealed EOS: the answer ends there
        text, run = [], []
        for token in answer:  # decode runs of revealed tokens, one marker per masked position
            if token == event.mask_token_id:
                text.append(decode(run) if run else "")
                run = []
                text.append(MASK_MARKER)
            else:
                run.append(token)
        text.append(decode(run) if run else "")
        masked = sum(t == event.mask_token_id for t in answer)
        generated = event.canvas[event.prompt_length :].tolist()
        cells = [None if t == event.mask_token_id else decode([t]) for t in generated]  # None: masked
        return self._base(True) | {
            "choices": [],
            "denoising": {
                "step": event.step,
                "steps": event.total_steps,
                "block": event.block,
                "masked": masked,
                "revealed": event.revealed,
                "text": "".join(text),
                "cells": cells,  # every generated position, its decoded token or null while masked
                "eos_at": eos,  # the answer ends at this position (None: no EOS revealed yet)
            },
        }
