"""The Python API: prompt forms, outputs, chat templates, and bad settings rejected before any work."""

import pytest

from mosaic_dllm import LLM, GenerationConfig, GenerationConfigError, PromptError

SMALL = GenerationConfig(gen_length=8, steps=4, block_length=4)


@pytest.fixture(scope="module")
def llada(tiny_checkpoints, tiny_llm):
    return tiny_llm("llada")


def test_prompt_forms(llada):
    one = llada.generate("The quick brown fox", SMALL)
    assert len(one) == 1 and isinstance(one[0].text, str)
    ids = llada.encode("The quick brown fox")
    assert llada.generate(ids, SMALL)[0].token_ids == one[0].token_ids
    many = llada.generate(["The quick brown fox", ids], SMALL)
    assert [o.token_ids for o in many] == [one[0].token_ids] * 2
    out = one[0]
    assert len(out.token_ids) == 8 and out.prompt_token_ids == ids
    assert out.forward_passes == 4 and out.steps == 4 and out.seconds > 0
    assert out.finish_reason in ("stop", "length")


def test_chat_template_applied(llada, tiny_checkpoints, tiny_llm):
    ids = llada.encode("hello", chat=True)
    text = llada.tokenizer.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nhello<|eot_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    dream = tiny_llm("dream")
    assert dream.tokenizer.decode(dream.encode("hi", chat=True), skip_special_tokens=False) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize(
    "prompt,message",
    [
        ("", "empty"),
        ("   ", "empty"),
        ([], "empty"),
        ([1, 10_000], "outside the vocabulary"),
        ([-1], "outside"),
    ],
)
def test_bad_prompts(llada, prompt, message):
    with pytest.raises(PromptError, match=message):
        llada.generate(prompt, SMALL)


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(gen_length=10, block_length=4), "gen_length \\(10\\) must be divisible by block_length \\(4\\)"),
        (dict(gen_length=8, block_length=4, steps=3), "steps \\(3\\) must be divisible by the number of blocks"),
        (dict(gen_length=0), "gen_length must be a positive integer"),
        (dict(gen_length=8, steps=-2), "steps must be a positive integer"),
        (dict(gen_length=8, block_length=0), "block_length must be a positive integer"),
        (dict(temperature=-0.1), "temperature must be in \\[0, 10\\]"),
        (dict(cfg_scale=-1.0), "cfg_scale must be in \\[0, 100\\]"),
        (dict(remasking="greedy"), "remasking must be one of"),
        (dict(alg="entropy"), "apply to Dream only"),
    ],
)
def test_bad_llada_settings(llada, settings, message):
    with pytest.raises(GenerationConfigError, match=message):
        llada.generate("hello", GenerationConfig(**settings))


@pytest.mark.parametrize(
    "settings,message",
    [
        (dict(cfg_scale=1.0), "no classifier-free guidance"),
        (dict(block_length=4, gen_length=8), "no blocks"),
        (dict(alg="best"), "alg must be one of"),
        (dict(top_p=1.5), "top_p must be in"),
        (dict(top_k=-1), "top_k must be a positive integer, or 0 for no top-k"),
        (dict(eps=0.0), "eps must be in"),
    ],
)
def test_bad_dream_settings(tiny_checkpoints, settings, message, tiny_llm):
    with pytest.raises(GenerationConfigError, match=message):
        tiny_llm("dream").generate("hello", GenerationConfig(**settings))


def test_unknown_setting_named():
    with pytest.raises(GenerationConfigError, match="unknown generation settings \\['temprature'\\]"):
        GenerationConfig.from_dict({"temprature": 1.0})


def test_longer_than_trained_context_is_refused_unless_allowed(llada, tiny_checkpoints):
    with pytest.raises(PromptError, match="allow_long_context=True"):
        llada.generate([1, 2], GenerationConfig(gen_length=256, steps=1))
    allowing = LLM(tiny_checkpoints["llada"], allow_long_context=True)
    with pytest.warns(UserWarning, match="more than the checkpoint's context") as warned:
        out = allowing.generate([1, 2], GenerationConfig(gen_length=256, steps=1))[0]
    assert len(out.token_ids) == 256
    assert warned[0].filename == __file__  # the warning points at the caller's line


def test_text_without_tokenizer_is_refused(tiny_checkpoints, tmp_path):
    import shutil

    shutil.copytree(tiny_checkpoints["llada"], tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").unlink()
    llm = LLM(tmp_path / "m")
    with pytest.raises(PromptError, match="no tokenizer files"):
        llm.generate("hello", SMALL)
    assert len(llm.generate([1, 2, 3], SMALL)[0].token_ids) == 8


def test_the_engine_describes_itself_to_front_ends(llada):
    """What the server and the page show comes from `LLM.info`, not from the engine's parts."""
    info = llada.info
    assert (info.family, info.sampler, info.executor) == ("llada", "llada", "mosaic")
    assert info.memory_budget and info.max_batch >= 1 and info.context == llada.spec.max_position_embeddings
    request = llada.request([5, 6, 7], llada.resolve(GenerationConfig(gen_length=8, steps=8), 3))
    assert request.plan.predicted_peak_bytes <= info.memory_budget
