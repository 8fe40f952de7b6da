"""The `mosaic` command line, run in-process."""

import contextlib
import json
from dataclasses import replace

import pytest
import torch

from mosaic_dllm.cli import main
from tests.profiles import INTEL_AMX


@pytest.mark.parametrize("family", ["llada", "dream", "llada_moe"])
def test_generate_json(tiny_checkpoints, family, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_checkpoints[family]),
        "--prompt",
        "The quick",
        "--gen-length",
        "8",
        "--steps",
        "4",
        "--seed",
        "2",
        "--json",
    ]
    assert main(args) == 0
    captured = capsys.readouterr()
    record = json.loads(captured.out)
    assert record["family"] == family and len(record["token_ids"]) == 8 and record["forward_passes"] == 4
    assert "denoising" in captured.err  # the progress bar goes to stderr


def test_generate_plain_text_and_flags(tiny_checkpoints, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_checkpoints["llada"]),
        "--prompt",
        "hi",
        "--gen-length",
        "8",
        "--block-length",
        "4",
        "--steps",
        "4",
        "--temperature",
        "0.5",
        "--cfg-scale",
        "1",
        "--remasking",
        "random",
        "--chat",
        "--dtype",
        "bf16",
        "--no-progress",
        "--stop-at-eos",
    ]
    assert main(args) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("threshold", ["0.9", "0.1"])
def test_generate_with_threshold_and_dual_cache_prints_its_forward_passes(threshold, capsys):
    """The default model with Fast-dLLM's settings: the forward passes said on stderr. Its confidences
    rarely reach 0.9 (one token a step); at 0.1 several tokens share a step."""
    args = ["generate", "--prompt", "Return the number of", "--threshold", threshold, "--cache", "dual", "--json"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["settings"]["cache"] == "dual" and out["settings"]["threshold"] == float(threshold)
    assert out["forward_passes"] < len(out["token_ids"]) or threshold == "0.9"
    assert main(args[:-1]) == 0
    err = capsys.readouterr().err
    assert f"{out['forward_passes']} forward passes for {len(out['token_ids'])} generated tokens" in err


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--threshold", "1.5"], "threshold must be in (0, 1]"),
        (["--cache", "dual", "--cfg-scale", "1"], "no classifier-free guidance"),
        (["--gen-length", "10", "--block-length", "4"], "must be divisible by block_length"),
        (["--temperature", "-1"], "temperature must be in [0, 10]"),
        (["--prompt", ""], "the prompt is empty"),
    ],
)
def test_generate_bad_input_is_a_clear_error(tiny_checkpoints, extra, message, capsys):
    args = ["generate", "--model", str(tiny_checkpoints["llada"]), "--prompt", "hi", "--no-progress", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err


def test_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "none"), "--prompt", "hi"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_info(tiny_checkpoints, capsys):
    assert main(["info", str(tiny_checkpoints["llada_moe"]), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["family"] == "llada_moe" and info["moe"]["num_experts"] == 4 and info["parameters"] > 0
    assert info["weight_bytes"] == info["parameters"] * 4


def test_plan_from_a_preset_without_weights(capsys):
    assert main(["plan", "--preset", "llada-8b", "--layers", "2", "--length", "1024", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    for key in ("length", "arena_bytes", "lower_bound_bytes", "peak_group", "predicted_peak_activation_bytes"):
        assert key in plan
    assert plan["length"] == 1024 and plan["chunks"]["logits_rows"] == 64 and plan["planning_seconds"] > 0
    assert plan["lower_bound_bytes"] <= plan["arena_bytes"] <= plan["predicted_peak_activation_bytes"]


def test_plan_from_a_checkpoint_config_and_as_text(tiny_checkpoints, capsys):
    assert main(["plan", "--model", str(tiny_checkpoints["dream"]), "--length", "300", "--ascii"]) == 0
    out = capsys.readouterr().out
    assert "arena" in out and "lower bound" in out and "peak at" in out and "|" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["plan", "--length", "100"], "exactly one of --preset"),
        (["plan", "--preset", "llada-8b", "--length", "1"], "at least 2"),
        (["plan", "--preset", "llada-8b", "--length", "64", "--alpha", "1.5"], "alpha"),
        (["plan", "--preset", "nope", "--length", "64"], "unknown preset"),
        (["plan", "--preset", "llada-8b", "--length", "64", "--rows", "0"], "--rows must be in 1..64"),
        (["plan", "--preset", "llada-8b", "--length", "64", "--rows", "65"], "--rows must be in 1..64"),
        (["plan", "--preset", "llada-8b", "--length", "64", "--cache", "prefix", "--block-length", "0"], "block"),
        (["plan", "--preset", "llada-8b", "--length", "64", "--budget", "0"], "--budget must be at least 1"),
        (["plan", "--preset", "llada-8b", "--length", "64", "--budget", "1e999GiB"], "cannot read"),
        (["plan", "--preset", "llada-8b", "--length", "64", "--budget", "1e30"], "not a memory size"),
        (["plan", "--preset", "llada-8b", "--layers", "0", "--length", "64"], "--layers: must be in 1..16777216"),
        (["bench", "max-len", "--preset", "llada-8b", "--budget", "0"], "--budget must be at least 1"),
        (["serve", "--max-connections", "0"], "argument --max-connections: must be in 1..1048576"),
        (["serve", "--header-timeout", "-1"], "argument --header-timeout: must be in 0.1..3600.0"),
        (["serve", "--header-timeout", "nan"], "argument --header-timeout: must be in"),
        (["serve", "--body-timeout", "inf"], "argument --body-timeout: must be in"),
        (["serve", "--port", "99999"], "argument --port: must be in 0..65535"),
        (["serve", "--max-queue", "-1"], "argument --max-queue: must be in 0..1048576"),
        (["serve", "--max-body", "1e999GiB"], "cannot read"),
    ],
)
def test_plan_bad_input(argv, message, capsys):
    """Every number is checked before any work: zero, negative, overflowing, past what it counts."""
    with contextlib.suppress(SystemExit):  # argparse's own refusals exit 2 too
        assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_plan_max_len_json_eager_vs_mosaic(capsys):
    argv = ["plan", "--preset", "llada-8b", "--layers", "2", "--max-len", "--budget", "256MiB", "--json"]
    assert main(argv) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["budget_bytes"] == 256 << 20 and record["predicted"] is True
    eager, mosaic = record["executors"]["eager"], record["executors"]["mosaic"]
    assert 0 < eager["max_len"] < mosaic["max_len"]
    assert mosaic["predicted_peak_activation_bytes"] <= 256 << 20 and "attention" in mosaic["chunks"]


def test_plan_max_len_needs_one_budget(capsys):
    assert main(["plan", "--preset", "llada-8b", "--max-len"]) == 2
    assert "exactly one of --budget" in capsys.readouterr().err
    assert main(["plan", "--preset", "llada-8b", "--max-len", "--device-memory", "8GiB"]) == 2
    assert "weights alone" in capsys.readouterr().err


def test_plan_max_batch_is_the_most_requests_whose_batched_step_fits(capsys):
    argv = ["plan", "--preset", "llada-8b", "--layers", "2", "--length", "1024", "--max-batch", "--budget", "1GiB"]
    assert main([*argv, "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    most = record["max_batch"]
    assert most >= 2 and record["predicted_peak_activation_bytes"] <= 1 << 30
    from mosaic_dllm.bench.capacity import first_step_shape
    from mosaic_dllm.bench.presets import preset
    from mosaic_dllm.plan.search import DoesNotFit, fit
    from mosaic_dllm.plan.step_plan import PlanCache

    spec = preset("llada-8b", 2)
    shape = first_step_shape(spec, torch.bfloat16, 1024, 0.5, 64)
    with pytest.raises(DoesNotFit):  # one more request does not fit, chunked as far as the search goes
        fit(PlanCache(spec, torch.bfloat16), replace(shape, lengths=shape.lengths * (most + 1)), 1 << 30, explain=False)
    assert main(argv[:-2]) == 2 and "--max-batch needs --budget" in capsys.readouterr().err


def test_plan_counts_a_block_cache(capsys):
    """With --cache the request's block cache joins the plan: the same arena, a peak larger by the
    cache (2 layers x L x K and V x 4096 x bf16 for dual), and fewer requests per batched step."""
    argv = ["plan", "--preset", "llada-8b", "--layers", "2", "--length", "1024", "--json"]
    records = {}
    for cache in ("none", "dual"):
        assert main([*argv, "--cache", cache]) == 0
        records[cache] = json.loads(capsys.readouterr().out)
    dual = 2 * 2 * 1024 * 4096 * 2
    assert records["dual"]["cache_bytes"] == dual and records["none"]["cache_bytes"] == 0
    assert (
        records["dual"]["predicted_peak_activation_bytes"] == records["none"]["predicted_peak_activation_bytes"] + dual
    )
    batch = ["--max-batch", "--budget", "1GiB"]
    most = {}
    for cache in ("none", "prefix", "dual"):
        assert main([*argv, *batch, "--cache", cache, "--block-length", "512"]) == 0  # prefix: half the canvas
        most[cache] = json.loads(capsys.readouterr().out)["max_batch"]
    assert most["dual"] < most["prefix"] < most["none"]


def test_plan_shows_recompute_and_its_extra_compute(capsys):
    """Below the exact floor `mosaic plan` refuses, naming --allow-recompute; allowed, it shows the
    recomputing plan, how often K and V are computed and the extra multiply-adds; --max-len lists
    the longer length recompute reaches."""
    amx = ["--profile", str(INTEL_AMX)]  # a device whose kernel copies K and V: recompute pays 1.5x+
    argv = ["plan", "--preset", "llada-8b", "--layers", "2", "--length", "8192", "--budget", "256MiB", *amx]
    assert main(argv) == 2
    assert "--allow-recompute" in capsys.readouterr().err
    assert main([*argv, "--allow-recompute"]) == 0
    out = capsys.readouterr().out
    assert "K and V computed" in out and "multiply-adds" in out
    assert main([*argv, "--allow-recompute", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["kv_passes_per_layer"] > 1 and record["extra_compute"] > 0
    assert record["predicted_peak_activation_bytes"] <= 256 << 20 and record["chunks"]["recompute"] > 1
    assert main(["plan", "--preset", "llada-8b", "--layers", "2", "--length", "8192", "--budget", "1GiB", *amx]) == 0
    assert "exact (bit-identical to eager)" in capsys.readouterr().out
    lengths = ["plan", "--preset", "llada-8b", "--layers", "2", "--max-len", "--budget", "256MiB", "--json", *amx]
    assert main([*lengths, "--allow-recompute"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert record["executors"]["mosaic-recompute"]["max_len"] > 1.5 * record["executors"]["mosaic"]["max_len"]
    assert "AMX" in record["device"]


def test_device_prints_the_profile_and_plan_reads_a_saved_one(capsys, tmp_path):
    """`mosaic device --json` measures (or reads) this machine's rules; the file it writes plans
    for this machine elsewhere: the same plan as planning here."""
    assert main(["device", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert set(record["attention"]) == {"bf16", "fp16", "fp32"} and record["gemm"] and record["fingerprint"]
    assert main(["device", "--json"]) == 0  # warm: read from the cache, nothing probed
    assert json.loads(capsys.readouterr().out)["probed_now"] == 0
    saved = tmp_path / "here.json"
    saved.write_text(json.dumps(record))
    argv = ["plan", "--preset", "llada-8b", "--layers", "2", "--length", "4096", "--budget", "200MiB", "--json"]
    assert main(argv) == 0
    here = json.loads(capsys.readouterr().out)
    assert main([*argv, "--profile", str(saved)]) == 0
    assert json.loads(capsys.readouterr().out)["chunks"] == here["chunks"]
    assert main([*argv[:-1], "--profile", str(tmp_path / "missing.json")]) == 2
    assert "cannot read a device profile" in capsys.readouterr().err


def test_generate_allows_recompute(capsys):
    argv = ["generate", "--prompt", "Return the", "--gen-length", "8", "--steps", "4", "--json", "--allow-recompute"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"]


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_allow_recompute_reaches_the_engine(command):
    from mosaic_dllm.cli import build_parser
    from mosaic_dllm.cli.commands import load_engine as _load

    extra = ["--prompt", "x"] if command == "generate" else []
    for flags, allowed in (([], False), (["--allow-recompute"], True)):
        args = build_parser().parse_args([command, *extra, *flags])
        groups = _load(args, None).executor.options.chunk_groups
        assert ("recompute" in groups) is allowed


def test_plan_max_len_says_when_the_search_hit_its_limit_and_the_context(capsys):
    from mosaic_dllm.engine import default_model_path

    assert main(["plan", "--model", str(default_model_path()), "--max-len", "--budget", "80GiB"]) == 0
    out = capsys.readouterr().out
    assert "at least 4194304 (nothing failed up to the search's limit)" in out and "mosaic / eager" not in out
    assert "the model's context is 1024 tokens" in out
