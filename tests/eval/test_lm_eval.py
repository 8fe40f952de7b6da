"""lm-evaluation-harness end to end on a tiny local task (no download): a generation metric and a
multiple-choice one, through `lm_eval.simple_evaluate` and through `mosaic eval`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")

ROOT = Path(__file__).resolve().parents[2]
TASKS = ROOT / "tests" / "eval" / "tasks"
ARGS = "gen_length=16,steps=16,block_length=16,mc_num=4,mc_batch_size=2"


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tasks name their data relative to the repository
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_simple_evaluate_runs_both_kinds_of_task():
    from lm_eval.tasks import TaskManager

    import mosaic_dllm.evaluation  # noqa: F401  (registers the model)

    results = lm_eval.simple_evaluate(
        model="mosaic",
        model_args=ARGS,
        tasks=["mosaic_tiny_gen", "mosaic_tiny_mc"],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
    )
    gen, mc = results["results"]["mosaic_tiny_gen"], results["results"]["mosaic_tiny_mc"]
    assert 0.0 <= gen["exact_match,none"] <= 1.0 and 0.0 <= mc["acc,none"] <= 1.0
    samples = results["samples"]["mosaic_tiny_gen"]
    assert len(samples) == 4 and all("\n" not in s["resps"][0][0] for s in samples)  # cut at the stop sequences
    scores = [s["resps"] for s in results["samples"]["mosaic_tiny_mc"]]
    assert all(len(pair) == 2 and all(r[0][1] is False for r in pair) for pair in scores)
    used = results["config"]["mosaic"]["settings_by_task"]  # what each task ran with, in the results
    assert used["mosaic_tiny_mc"]["likelihood"]["mc_num"] == 4
    assert used["mosaic_tiny_gen"]["generation"]["gen_length"] == 16


@pytest.mark.slow
def test_mosaic_eval_is_lm_evals_command_line(tmp_path, capsys):
    from mosaic_dllm.cli import main

    argv = ["eval", "run", "--model", "mosaic", "--model_args", ARGS, "--tasks", "mosaic_tiny_gen"]
    argv += ["--include_path", str(TASKS), "--output_path", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "mosaic_tiny_gen" in out and "exact_match" in out
    assert list(tmp_path.rglob("results_*.json")), "lm-eval wrote no results"
    json.loads(next(tmp_path.rglob("results_*.json")).read_text())


@pytest.mark.slow
def test_a_dream_checkpoint_runs_a_multiple_choice_task_with_dreams_estimator(tiny_checkpoints):
    """lm-eval's multiple-choice and perplexity requests on a tiny Dream checkpoint go through
    Dream's own estimator (ftb, as its evaluation script), offline."""
    from lm_eval.tasks import TaskManager

    import mosaic_dllm.evaluation  # noqa: F401  (registers the model)

    results = lm_eval.simple_evaluate(
        model="mosaic",
        model_args=f"pretrained={tiny_checkpoints['dream']},mc_num=4,mc_batch_size=2,log_type=ftb",
        tasks=["mosaic_tiny_mc", "mosaic_tiny_ppl"],
        task_manager=TaskManager(include_path=str(TASKS)),
        log_samples=True,
    )
    assert 0.0 <= results["results"]["mosaic_tiny_mc"]["acc,none"] <= 1.0
    scores = [r[0][0] for s in results["samples"]["mosaic_tiny_mc"] for r in s["resps"]]
    assert len(scores) == 8 and all(score < 0 for score in scores)  # log-likelihoods of the choices
    assert results["results"]["mosaic_tiny_ppl"]["word_perplexity,none"] > 1  # and a perplexity task


def test_presets_fill_what_the_official_scripts_pass_per_task(tiny_checkpoints, capsys):
    """LLaDA-8B-Base's eval_llada_lm_eval.sh: guidance per task, one sample for MMLU (its subtasks
    too), 1024-token generation; the model args given win; Dream's scripts: BOS, entropy, top-p."""
    from mosaic_dllm.evaluation import MosaicLM, preset_settings

    assert preset_settings("llada-base", "mmlu_anatomy") == {"mc_num": 1, "mc_batch_size": 1, "cfg_scale": 0.0}
    assert preset_settings("llada-base", "truthfulqa_mc2") == {"mc_num": 128, "mc_batch_size": 8, "cfg_scale": 2.0}
    model = MosaicLM(str(tiny_checkpoints["llada"]), preset="llada-base", mc_num=16)
    assert "truthfulqa_mc2: {'cfg_scale': 2.0}" in capsys.readouterr().err
    assert model.cpu_gen is model.gen  # on a CPU model the official device and CPU draws share one generator
    piqa = model.options_for("piqa")
    assert (piqa.mc_num, piqa.batch_size, piqa.cfg_scale) == (16, 8, 0.5)
    gsm8k = model.config_for({"max_gen_toks": 16}, "gsm8k")
    assert (gsm8k.gen_length, gsm8k.steps, gsm8k.block_length) == (1024, 1024, 1024)
    assert model.config_for({"max_gen_toks": 16}, "other").gen_length == 16
    dream = MosaicLM(str(tiny_checkpoints["dream"]), preset="dream-base")
    assert dream.options_for("arc_easy").add_bos_token and dream.config_for({}, "gsm8k_cot").alg == "entropy"
    assert preset_settings("llada-instruct", "mmlu_pro_law")["gen_length"] == 256  # not mmlu's 3
    instruct = MosaicLM(str(tiny_checkpoints["llada"]), preset="llada-instruct")
    gsm8k = instruct.config_for({"max_gen_toks": 16}, "gsm8k")
    assert (gsm8k.gen_length, gsm8k.block_length, gsm8k.confidence_eos_eot_inf) == (512, 512, True)
    assert instruct.config_for({}, "humaneval").logits_eos_inf and instruct.config_for({}, "mmlu").gen_length == 3
    with pytest.raises(ValueError, match="unknown preset"):
        MosaicLM(str(tiny_checkpoints["llada"]), preset="gpt")


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_rolling_likelihood_is_the_sum_over_its_windows(tiny_checkpoints, family):
    """Perplexity: the text in windows of max_length tokens, each scored given the text before it,
    summed; equal to that sum computed directly with the same draws."""
    from types import SimpleNamespace

    from mosaic_dllm.decoding.likelihood import LikelihoodOptions

    text = "Return the number of items in the list. Open the file and read every line of it."
    model = MosaicLM_for(tiny_checkpoints[family])
    got = model.loglikelihood_rolling([SimpleNamespace(args=(text,), task_name="wikitext")])[0]
    llm, gen = model.llm, torch.Generator().manual_seed(1234)
    tokens, eos = llm.tokenizer.encode(text), llm.spec.eos_token_ids[0]
    assert len(tokens) > 24  # at least three windows of 12
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    options, total, seen = LikelihoodOptions(mc_num=4, batch_size=2, max_length=12), 0.0, []
    width = 11 if family == "llada" else 10  # the prefix token (and Dream's EOS) inside 12
    for prefix, target in map(make_disjoint_window, get_rolling_token_windows(tokens, eos, width, 1)):
        scored = target if family == "llada" else [*target, eos]
        assert len(prefix) + len(scored) <= 12
        pair = (torch.tensor(prefix), torch.tensor(scored))
        total += llm.sampler.log_likelihoods(llm.executor, [pair], gen, options)[0]
        seen.extend(target)
    assert seen == tokens and got == total


def MosaicLM_for(path):  # noqa: N802
    from mosaic_dllm.evaluation import MosaicLM

    return MosaicLM(str(path), mc_num=4, mc_batch_size=2, max_length=12)
