"""Dream's settings resolve as its official `diffusion_generate` resolves them when a call leaves
them out: the model config's attributes (with transformers' legacy defaults, top_k=50 above all),
then DreamGenerationConfig's defaults, then the call (restated in tests/reference.py)."""

import json
import shutil

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from mosaic_dllm.cli import main
from tests import reference

PROMPTS = ([5, 17, 42, 99, 7, 64], [3, 9, 27, 81, 243, 11, 101, 200, 150])
MODEL_CONFIGS = [
    {},
    {"top_k": 20, "temperature": 0.5},
    {"top_k": None, "top_p": 0.8},
    {"max_new_tokens": 7},
    {"max_length": 40, "steps": 9, "alg": "entropy"},
]
CALLS = [{}, {"temperature": 0.0}, {"top_k": 5, "max_new_tokens": 12}, {"top_p": 0.9, "steps": 3}]


@pytest.fixture(scope="module")
def dream(tiny_checkpoints):
    return LLM(tiny_checkpoints["dream"], dtype=torch.bfloat16)


def our_settings(call: dict) -> GenerationConfig:
    names = {"max_new_tokens": "gen_length"}
    return GenerationConfig(**{names.get(k, k): v for k, v in call.items()})


@pytest.mark.parametrize("model_config", MODEL_CONFIGS, ids=str)
@pytest.mark.parametrize("call", CALLS, ids=str)
def test_unset_settings_resolve_as_the_official_call(dream, model_config, call):
    from mosaic_dllm.decoding.dream import DreamSampler

    config = dream.checkpoint.model_config | model_config
    sampler = DreamSampler(dream.spec, config, {"top_k": 1, "temperature": 0.3})  # generation_config.json unread
    for prompt_length in (3, 30, 60):
        official = reference.dream_call_settings(config, prompt_length, **call)
        if official["max_new_tokens"] < 1:
            continue
        resolved = sampler.resolve(our_settings(call), prompt_length)
        ours = {k: getattr(resolved, k) for k in ("temperature", "top_p", "top_k", "eps", "steps", "alg", "alg_temp")}
        ours["top_k"] = ours["top_k"] or None  # top_k 0 is the official None: no top-k
        assert ours | {"max_new_tokens": resolved.gen_length} == official


def test_a_call_without_settings_uses_the_legacy_defaults(dream):
    resolved = dream.resolve(GenerationConfig(), prompt_length=6)
    assert (resolved.temperature, resolved.top_k, resolved.top_p) == (1.0, 50, 1.0)
    assert (resolved.steps, resolved.alg, resolved.gen_length) == (512, "origin", 20)


@pytest.mark.parametrize("prompt", PROMPTS, ids=len)
def test_tokens_with_top_k_unset_equal_the_official_call(dream, prompt):
    """entropy ranks by the renormalised top-50 distribution: unset top_k must mean 50, not 'off'."""
    model = lambda ids: reference.hf_logits(*reference.load_state(dream.checkpoint.path, torch.bfloat16), ids)  # noqa: E731
    call = {"max_new_tokens": 16, "steps": 12, "alg": "entropy", "temperature": 0.0}
    out = dream.generate(prompt, GenerationConfig(gen_length=16, steps=12, alg="entropy", temperature=0.0))[0]
    official = reference.dream_diffusion_generate(
        model, dream.checkpoint.model_config, torch.tensor([prompt]), dream.spec.mask_token_id, **call
    )
    assert out.token_ids == official[0, len(prompt) :].tolist()
    assert out.settings["top_k"] == 50


def test_the_grid_can_tell_top_k_50_from_no_top_k(dream):
    """The case above is sensitive: with top_k off the official tokens differ."""
    model = lambda ids: reference.hf_logits(*reference.load_state(dream.checkpoint.path, torch.bfloat16), ids)  # noqa: E731
    call = {"max_new_tokens": 16, "steps": 12, "alg": "entropy", "temperature": 0.0}
    differs = []
    for prompt in PROMPTS:
        runs = [
            reference.dream_diffusion_generate(
                model, dream.checkpoint.model_config, torch.tensor([prompt]), dream.spec.mask_token_id, **call, top_k=k
            )
            for k in (50, None)
        ]
        differs.append(not torch.equal(*runs))
    assert any(differs)


def test_top_k_0_is_the_official_none_in_the_api_the_cli_and_http(dream, tiny_checkpoints, capsys, tiny_llm):
    """top_k=None in the official call (no top-k) is top_k=0 here (None is unset: 50); in JSON an
    explicit null says the same, distinct from an absent field."""
    from mosaic_dllm.server.schemas import CompletionRequest

    model = lambda ids: reference.hf_logits(*reference.load_state(dream.checkpoint.path, torch.bfloat16), ids)  # noqa: E731
    call = {"max_new_tokens": 16, "steps": 12, "alg": "entropy", "temperature": 0.0}
    for prompt in PROMPTS:
        official = reference.dream_diffusion_generate(
            model, dream.checkpoint.model_config, torch.tensor([prompt]), dream.spec.mask_token_id, **call, top_k=None
        )
        out = dream.generate(prompt, GenerationConfig(gen_length=16, steps=12, alg="entropy", temperature=0.0, top_k=0))
        assert out[0].token_ids == official[0, len(prompt) :].tolist()
    resolved = dream.resolve(GenerationConfig(top_k=0), prompt_length=6)
    assert resolved.top_k == 0 and dream.resolve(resolved, prompt_length=6) == resolved

    args = ["generate", "--model", str(tiny_checkpoints["dream"]), "--prompt", "The quick", "--gen-length", "8"]
    assert main([*args, "--steps", "4", "--top-k", "0", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out)["settings"]["top_k"] == 0

    def settings(body: dict) -> dict:
        return CompletionRequest.model_validate({"prompt": "hi"} | body).generation_settings()

    assert settings({"top_k": None})["top_k"] == 0 and settings({})["top_k"] is None
    assert settings({"top_p": None})["top_p"] == 1.0 and settings({"top_k": 7})["top_k"] == 7
    llada = tiny_llm("llada")  # a family without top-k / top-p takes their off values as no-ops
    body = {"max_tokens": 4, "steps": 4, "top_k": None, "top_p": 1.0}
    off = {k: v for k, v in settings(body).items() if v is not None}
    assert llada.generate([5, 17], GenerationConfig(**off))[0].settings["top_k"] == 0


def test_config_json_settings_are_used_and_generation_config_json_is_not(tiny_checkpoints, tmp_path):
    path = tmp_path / "dream"
    shutil.copytree(tiny_checkpoints["dream"], path)
    config = json.loads((path / "config.json").read_text()) | {"top_k": 7, "temperature": 0.25}
    (path / "config.json").write_text(json.dumps(config))
    (path / "generation_config.json").write_text(json.dumps({"top_k": 3, "temperature": 0.9, "steps": 4}))
    resolved = LLM(path).resolve(GenerationConfig(gen_length=8), prompt_length=4)
    assert (resolved.top_k, resolved.temperature, resolved.steps) == (7, 0.25, 512)


def test_cli_json_states_the_resolved_settings(tiny_checkpoints, capsys):
    args = ["generate", "--model", str(tiny_checkpoints["dream"]), "--prompt", "The quick brown", "--gen-length", "8"]
    assert main([*args, "--steps", "4", "--json", "--no-progress"]) == 0
    settings = json.loads(capsys.readouterr().out)["settings"]
    assert settings["top_k"] == 50 and settings["temperature"] == 1.0 and settings["alg"] == "origin"
