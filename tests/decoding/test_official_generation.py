"""Tokens from the engine equal the restated official LLaDA and Dream samplers, setting by setting."""

import pytest
import torch

from mosaic_dllm import LLM, GenerationConfig
from tests import reference

PROMPT = [5, 17, 42, 99, 7, 64]


def official_model(llm: LLM, family: str):
    config, state = reference.load_state(llm.checkpoint.path, llm.checkpoint.dtype)
    forward = reference.llada_logits if family == "llada" else reference.hf_logits
    return lambda ids: forward(config, state, ids)


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def dtype(request):
    return request.param


# The eager executor (full logits) and the Mosaic executor (mask-only logits, in chunks of 3 rows
# so that every step spans several chunks) must both give the official tokens.
@pytest.fixture(
    scope="module", params=[{"executor": "eager"}, {"executor": "mosaic", "row_chunk": 3}], ids=["eager", "mosaic"]
)
def executor(request):
    return request.param


LLADA_SETTINGS = [
    dict(gen_length=16, steps=16, block_length=16, temperature=0.0, cfg_scale=0.0, remasking="low_confidence"),
    dict(gen_length=16, steps=8, block_length=4, temperature=0.0, cfg_scale=0.0, remasking="low_confidence"),
    dict(gen_length=12, steps=5, block_length=12, temperature=0.0, cfg_scale=0.0, remasking="low_confidence"),
    dict(gen_length=16, steps=8, block_length=8, temperature=0.7, cfg_scale=0.0, remasking="low_confidence"),
    dict(gen_length=16, steps=8, block_length=8, temperature=0.0, cfg_scale=0.0, remasking="random"),
    dict(gen_length=16, steps=8, block_length=8, temperature=1.0, cfg_scale=0.0, remasking="random"),
    dict(gen_length=16, steps=8, block_length=8, temperature=0.0, cfg_scale=1.5, remasking="low_confidence"),
    dict(gen_length=16, steps=4, block_length=8, temperature=0.5, cfg_scale=0.5, remasking="low_confidence"),
]


@pytest.mark.parametrize("family", ["llada", "llada_moe"])
@pytest.mark.parametrize("settings", LLADA_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_llada_matches_official(tiny_checkpoints, family, settings, dtype, executor):
    llm = LLM(tiny_checkpoints[family], dtype=dtype, **executor)
    out = llm.generate(PROMPT, GenerationConfig(seed=11, **settings))[0]
    torch.manual_seed(11)
    official = reference.llada_generate(
        official_model(llm, family),
        torch.tensor([PROMPT]),
        settings["steps"],
        settings["gen_length"],
        settings["block_length"],
        settings["temperature"],
        settings["cfg_scale"],
        settings["remasking"],
        llm.spec.mask_token_id,
    )
    assert out.token_ids == official[0, len(PROMPT) :].tolist()
    assert out.forward_passes == settings["steps"]


@pytest.fixture(scope="module")
def eos_prone(tmp_path_factory):
    """A tiny LLaDA whose EOS and end-of-turn logits are often the largest, so LLaDA-Instruct's
    evaluation options (which act on exactly those tokens) change the tokens compared."""
    from safetensors.torch import load_file, save_file

    from tests.tiny import build_tiny_checkpoint

    path = tmp_path_factory.mktemp("eos_prone")
    build_tiny_checkpoint(path, "llada")
    llm = LLM(path)
    eos, eot = llm.spec.eos_token_ids[0], llm.tokenizer.token_to_id("<|eot_id|>")
    state = load_file(path / "model.safetensors")
    head = "model.transformer.ff_out.weight"
    state[head][[eos, eot]] *= 3
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path, eos, eot


@pytest.mark.parametrize(
    "settings",
    [
        dict(logits_eos_inf=True, temperature=0.0),
        dict(confidence_eos_eot_inf=True, temperature=0.0),
        dict(confidence_eos_eot_inf=True, temperature=0.8),
        dict(logits_eos_inf=True, confidence_eos_eot_inf=True, temperature=0.5, cfg_scale=1.0),
    ],
    ids=str,
)
def test_llada_instruct_evaluation_options_match_official(eos_prone, settings, dtype, executor):
    path, eos, eot = eos_prone
    llm = LLM(path, dtype=dtype, **executor)
    base = dict(gen_length=16, steps=8, block_length=8, cfg_scale=0.0, remasking="low_confidence") | settings
    plain = {k: v for k, v in base.items() if "eos" not in k}
    out = llm.generate(PROMPT, GenerationConfig(seed=3, **base))[0]
    torch.manual_seed(3)
    official = reference.llada_generate(
        official_model(llm, "llada"),
        torch.tensor([PROMPT]),
        *(base[k] for k in ("steps", "gen_length", "block_length", "temperature", "cfg_scale", "remasking")),
        llm.spec.mask_token_id,
        base.get("logits_eos_inf", False),
        base.get("confidence_eos_eot_inf", False),
        eos,
        eot,
    )
    assert out.token_ids == official[0, len(PROMPT) :].tolist()
    without = llm.generate(PROMPT, GenerationConfig(seed=3, **plain))[0]
    assert without.token_ids != out.token_ids  # the options act here: the comparison can fail
    if base.get("logits_eos_inf"):
        assert eos not in out.token_ids and eos in without.token_ids


DREAM_SETTINGS = (
    [dict(alg=alg, temperature=0.0) for alg in ("origin", "maskgit_plus", "topk_margin", "entropy")]
    + [dict(alg=alg, temperature=0.8, top_p=0.9) for alg in ("origin", "maskgit_plus", "topk_margin", "entropy")]
    + [
        dict(alg="maskgit_plus", temperature=0.5, top_k=20),
        dict(alg="entropy", temperature=0.0, alg_temp=0.5),
        dict(alg="topk_margin", temperature=1.0, top_p=0.95, top_k=50, alg_temp=0.2),
    ]
)


@pytest.mark.parametrize("settings", DREAM_SETTINGS, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_dream_matches_official(tiny_checkpoints, settings, dtype, executor):
    """Settings the call leaves out (top_k above all) resolve as the official call resolves them."""
    llm = LLM(tiny_checkpoints["dream"], dtype=dtype, **executor)
    out = llm.generate(PROMPT, GenerationConfig(gen_length=16, steps=12, seed=5, **settings))[0]
    torch.manual_seed(5)
    official = reference.dream_diffusion_generate(
        official_model(llm, "dream"),
        llm.checkpoint.model_config,
        torch.tensor([PROMPT]),
        llm.spec.mask_token_id,
        max_new_tokens=16,
        steps=12,
        **settings,
    )
    assert out.token_ids == official[0, len(PROMPT) :].tolist()


def test_seed_reproducible_and_different_seeds_differ(tiny_checkpoints, tiny_llm):
    llm = tiny_llm("llada")
    cfg = GenerationConfig(gen_length=16, steps=8, temperature=1.0)
    a, b = (llm.generate(PROMPT, cfg)[0].token_ids for _ in range(2))
    c = llm.generate(PROMPT, GenerationConfig(gen_length=16, steps=8, temperature=1.0, seed=1))[0].token_ids
    assert a == b
    assert a != c
