"""Hugging Face tokenizer directories, read with the `tokenizers` library; chat templates with Jinja2."""

from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from .models.config_keys import SpecialIds

MASK_TOKEN_NAMES = ("<|mdm_mask|>", "<|mask|>", "[MASK]", "<mask>")


class TokenizerError(ValueError):
    """The tokenizer files are missing, corrupt, or cannot do what was asked."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):  # {"content": "<|eot_id|>", ...}
        return value.get("content")
    return value


class Tokenizer:
    def __init__(self, tokenizer: HFTokenizer, config: dict[str, Any]):
        self._tok = tokenizer
        self.config = config

    @classmethod
    def from_dir(cls, path: Path) -> Tokenizer | None:
        """The directory's tokenizer, or None when it ships none."""
        config_file = path / "tokenizer_config.json"
        config = _read_json(config_file) if config_file.exists() else {}
        if (path / "tokenizer.json").exists():
            try:
                tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
            except Exception as exc:  # the Rust error text names the problem
                raise TokenizerError(f"{path / 'tokenizer.json'} is not a valid tokenizer file: {exc}") from exc
        elif (path / "vocab.json").exists() and (path / "merges.txt").exists():
            tok = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
            added = config.get("added_tokens_decoder", {})
            for _, entry in sorted(added.items(), key=lambda kv: int(kv[0])):
                tok.add_special_tokens([AddedToken(entry["content"], special=entry.get("special", True))])
        else:
            return None
        return cls(tok, config)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def bos_text(self) -> str | None:
        """The BOS token's text (tokenizer_config.json's bos_token), if it has one."""
        return _token_text(self.config.get("bos_token"))

    @cached_property
    def special_tokens(self) -> tuple[str, ...]:
        """The text of every special token (added tokens marked special), longest first."""
        texts = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special and t.content}
        return tuple(sorted(texts, key=len, reverse=True))

    @cached_property
    def _special_pattern(self) -> re.Pattern | None:
        return re.compile("|".join(map(re.escape, self.special_tokens))) if self.special_tokens else None

    def special_token_in(self, text: str) -> str | None:
        """The first special token found in `text`, in one pass over it (None: none occurs)."""
        found = self._special_pattern.search(text) if self._special_pattern else None
        return found.group(0) if found else None

    @cached_property
    def longest_token_chars(self) -> int:
        """Characters of the longest token: a text of n characters is at least n / this many tokens."""
        return max(map(len, self._tok.get_vocab(with_added_tokens=True)), default=1)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def special_ids(self) -> SpecialIds:
        mask = next((i for n in MASK_TOKEN_NAMES if (i := self.token_to_id(n)) is not None), None)
        eos_text = _token_text(self.config.get("eos_token"))
        pad_text = _token_text(self.config.get("pad_token"))
        eos = self.token_to_id(eos_text) if eos_text else None
        pad = self.token_to_id(pad_text) if pad_text else None
        return SpecialIds(mask_token_id=mask, eos_token_ids=(eos,) if eos is not None else (), pad_token_id=pad)

    @cached_property
    def chat_template(self) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        if not self.chat_template:
            raise TokenizerError(
                "this checkpoint has no chat template (tokenizer_config.json has no chat_template): it completes "
                "text and was not made for chat; send a plain prompt (CLI: without --chat; HTTP: /v1/completions)"
            )

        def raise_exception(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        try:
            return env.from_string(self.chat_template).render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=_token_text(self.config.get("bos_token")) or "",
                eos_token=_token_text(self.config.get("eos_token")) or "",
            )
        except TemplateError as exc:
            raise TokenizerError(f"chat template failed: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TokenizerError(f"{path} is not readable JSON: {exc}") from exc
