"""Train byte-level BPE tokenizers offline and write them as Hugging Face tokenizer directories.

Used for test checkpoints and for the embedded default model: real weights and tokenizers cannot be
downloaded here, so each family's special tokens (official names) are added to a small BPE.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

LLADA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Official special-token names per family: BOS (or None), EOS, the mask token, then the chat tokens.
FAMILY_SPECIALS = {
    "llada": dict(
        bos="<|startoftext|>",
        eos="<|endoftext|>",
        mask="<|mdm_mask|>",
        extra=["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
        template=LLADA_CHAT_TEMPLATE,
    ),
    "dream": dict(
        bos=None, eos="<|endoftext|>", mask="<|mask|>", extra=["<|im_start|>", "<|im_end|>"], template=CHATML_TEMPLATE
    ),
}
FAMILY_SPECIALS["llada_moe"] = FAMILY_SPECIALS["llada"]
FAMILY_SPECIALS["sdar"] = dict(FAMILY_SPECIALS["dream"], mask="<|MASK|>")
FAMILY_SPECIALS["llada2"] = dict(
    bos=None,
    eos="<|endoftext|>",
    mask="<|mask|>",
    extra=["<role>", "</role>", "<|role_end|>"],
    template=(
        "{% for m in messages %}<role>{{ m['role'] | upper }}</role>{{ m['content'] }}<|role_end|>{% endfor %}"
        "{% if add_generation_prompt %}<role>ASSISTANT</role>{% endif %}"
    ),
)

# Pieces for source code: a line break with the next line's indentation is one piece (so an
# indented line starts with one token), a name or number with its leading space, a run of
# punctuation, and whitespace that is left over. BPE merges within pieces only.
CODE_PIECES = Regex(r"\n[ \t]*| ?[A-Za-z_][A-Za-z_0-9]*| ?[0-9]+| ?[^\sA-Za-z_0-9]+|[ \t]+|\s")


def train_bpe(texts: list[str], family: str, vocab_size: int, code: bool = False) -> Tokenizer:
    """A byte-level BPE whose total size, special tokens included, is exactly `vocab_size`.

    `code`: split text into `CODE_PIECES` before the bytes (GPT-2's pieces otherwise), so that
    indentation and identifiers become tokens of their own.
    """
    specials = FAMILY_SPECIALS[family]
    names = [n for n in (specials["bos"], specials["eos"], specials["mask"]) if n] + specials["extra"]
    tok = Tokenizer(models.BPE())
    if code:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(CODE_PIECES, behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(names),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in names])
    reserved = vocab_size - tok.get_vocab_size(with_added_tokens=True)
    tok.add_special_tokens([AddedToken(f"<|reserved_{i}|>", special=True) for i in range(reserved)])
    return tok


def save_tokenizer(path: Path, tok: Tokenizer, family: str, chat: bool = True) -> dict[str, int | None]:
    """Write tokenizer.json + tokenizer_config.json + special_tokens_map.json; return the special ids.

    `chat`: write the family's chat template (a model never trained on chats gets none, so chat
    requests to it are refused rather than answered with noise)."""
    specials = FAMILY_SPECIALS[family]
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    special_map = {"eos_token": specials["eos"], "pad_token": specials["eos"]}
    if specials["bos"]:
        special_map["bos_token"] = specials["bos"]
    config = special_map | {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}
    if chat:
        config["chat_template"] = specials["template"]
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (path / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return {
        "bos": tok.token_to_id(specials["bos"]) if specials["bos"] else None,
        "eos": tok.token_to_id(specials["eos"]),
        "mask": tok.token_to_id(specials["mask"]),
    }
