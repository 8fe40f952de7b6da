"""Each generation setting is declared once (config.SETTINGS); the CLI flags, the server's request
fields, lm-eval's model args and the live page's fields are made from those declarations."""

import dataclasses
import re

import httpx
import pytest

from mosaic_dllm import LLM, GenerationConfig, GenerationConfigError
from mosaic_dllm.cli import build_parser
from mosaic_dllm.config import FAMILY_NAMES, LLADA, SDAR, SDAR_REMASKING, SETTINGS
from mosaic_dllm.evaluation import GENERATION_KEYS
from mosaic_dllm.server.schemas import CompletionRequest, page_settings
from tests.server.conftest import serving


def test_every_setting_reaches_every_surface():
    assert list(SETTINGS) == [f.name for f in dataclasses.fields(GenerationConfig)]
    generate = next(a for a in build_parser()._subparsers._actions if a.dest == "command").choices["generate"]
    flags = {o for a in generate._actions for o in a.option_strings}
    fields = set(CompletionRequest.model_fields)
    pages = {s["name"] for family in FAMILY_NAMES for s in page_settings(family)}
    for s in SETTINGS.values():
        assert s.flag in flags and s.field_name in fields and s.field_name in pages, s.name
    assert GENERATION_KEYS == tuple(SETTINGS)


def test_a_family_is_offered_and_accepts_its_own_choices(tiny_llm):
    """remasking: LLaDA's and SDAR's strategies differ; the page offers each family its own, and a
    family refuses the other's with one message."""
    offered = {f: next(s["choices"] for s in page_settings(f) if s["name"] == "remasking") for f in (LLADA, SDAR)}
    assert offered == {LLADA: ["low_confidence", "random"], SDAR: list(SDAR_REMASKING)}
    with pytest.raises(GenerationConfigError, match="remasking must be one of .* for a LLaDA / LLaDA-MoE model"):
        tiny_llm("llada").resolve(GenerationConfig(remasking="sequential"))


def test_bounds_and_choices_are_the_same_everywhere():
    """The request schema refuses what the engine refuses, with the setting's own bounds."""
    for s in SETTINGS.values():
        if s.low is None:
            continue
        below = s.low if s.low_open else s.low - 1
        with pytest.raises(GenerationConfigError, match=re.escape(s.name)):
            s.check(s.kind(below))
        body = {"prompt": "hi", s.field_name: s.kind(below)}
        with pytest.raises(ValueError, match=s.field_name):
            CompletionRequest.model_validate(body)


def test_a_setting_the_family_does_not_read_is_refused_unless_it_is_its_no_op(tiny_checkpoints, tiny_llm):
    llada = tiny_llm("llada")
    with pytest.raises(GenerationConfigError, match=r"\['eps'\] apply to Dream only"):
        llada.resolve(GenerationConfig(eps=0.5))
    assert llada.resolve(GenerationConfig(top_k=0, top_p=1.0, alg_temp=0.0)).top_k == 0
    dream = tiny_llm("dream")
    with pytest.raises(GenerationConfigError, match=r"\[.remasking.\] apply to LLaDA / LLaDA-MoE / SDAR only"):
        dream.resolve(GenerationConfig(remasking="random"))
    assert dream.resolve(GenerationConfig(remasking="low_confidence", cfg_scale=0.0)).gen_length


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_the_page_offers_the_fields_of_the_model_it_serves(tiny_checkpoints, family):
    ours = {"llada": {"remasking", "cfg_scale", "factor", "threshold", "cache"}, "dream": {"alg", "top_k", "eps"}}
    theirs = ours["dream" if family == "llada" else "llada"] - {"threshold", "cache"}
    with serving(LLM(tiny_checkpoints[family])) as (url, _):
        page = httpx.get(url + "/", timeout=30).text
    offered = set(re.findall(r'"name": "(\w+)"', page))
    assert ours[family] <= offered and not theirs & offered
    assert "</script>" not in page.split("const SETTINGS = ")[1].split(";\n")[0]
