"""The embedded default model: shipped in the package, loaded without a path, used by the README."""

from pathlib import Path

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.engine import default_model_path

README = Path(__file__).parents[1] / "README.md"


def test_shipped_checkpoint_loads_and_generates():
    path = default_model_path()
    assert (path / "config.json").exists() and (path / "model.safetensors").exists()
    assert (path / "model.safetensors").stat().st_size <= 50 * 2**20
    llm = LLM()  # no path: the default model
    assert llm.spec.family == "llada" and llm.info.context >= 1024
    out = llm.generate("def is_prime(n):\n", GenerationConfig(gen_length=16, steps=16, block_length=8))[0]
    assert len(out.token_ids) == 16 and isinstance(out.text, str)


def test_the_default_model_is_not_a_chat_model_and_says_so():
    """Trained on code, never on chats: no chat template, so chat is refused with what to do instead."""
    import pytest

    from mosaic_dllm.tokenizer import TokenizerError

    llm = LLM()
    assert llm.info.chat is False
    with pytest.raises(TokenizerError, match="no chat template.*send a plain prompt"):
        llm.generate("Hi", chat=True)


def test_readme_main_command_uses_the_default_model():
    commands = [line for line in README.read_text().splitlines() if "mosaic generate" in line]
    first = commands[0]
    assert first.startswith("python3 -m venv .venv") and "--model" not in first
