"""Benchmark instruments: prediction against measurement, the max-length search, the JSON records."""

import json

import pytest
import torch

from mosaic_dllm import GenerationConfig
from mosaic_dllm.bench.presets import PRESETS, preset
from mosaic_dllm.bench.runner import run_job
from mosaic_dllm.bench.step import StepRequest, measure, predict, random_weights
from mosaic_dllm.memory.sizes import parse_bytes
from mosaic_dllm.plan.search import DoesNotFit, longest
from tests.tiny import tiny_spec


@pytest.mark.parametrize(
    "family,cfg",
    [
        ("llada", GenerationConfig()),
        ("llada", GenerationConfig(cfg_scale=1.0, remasking="random")),
        ("llada", GenerationConfig(temperature=1.0)),  # the official float64 noise, replayed row by row
        ("dream", GenerationConfig(alg="entropy", top_p=0.9)),
    ],
)
@pytest.mark.parametrize("executor,options", [("eager", {}), ("mosaic", {"row_chunk": 7})])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prediction_equals_measurement(family, cfg, executor, options, dtype):
    spec = tiny_spec(family, ids={"mask": 317, "eos": 316})
    weights = random_weights(spec, dtype)
    for length in (40, 97):
        request = StepRequest.first_step(spec, length, 0.5, cfg)
        measured = measure(spec, weights, executor, request, options)
        assert predict(spec, dtype, executor, request, options).peak == measured.timeline.peak
        assert measured.seconds > 0 and measured.rss_growth_bytes is not None


def test_moe_prediction_is_refused_clearly():
    spec = tiny_spec("llada_moe", ids={"mask": 317, "eos": 316})
    with pytest.raises(NotImplementedError, match="MoE"):
        predict(spec, torch.bfloat16, "eager", StepRequest.first_step(spec, 32, 0.5, GenerationConfig()))


def test_presets_have_the_reference_dimensions():
    assert PRESETS["llada-8b"].vocab_size == 126464 and PRESETS["llada-8b"].intermediate_size == 12288
    assert PRESETS["dream-7b"].num_kv_heads == 4 and PRESETS["llada-moe-7b"].moe.num_experts == 64
    assert preset("llada-moe-7b", 2).num_layers == 2 and len(preset("llada-moe-7b", 2).moe.moe_layers) == 2
    with pytest.raises(ValueError, match="unknown preset"):
        preset("gpt-9")


@pytest.mark.parametrize("threshold", [1, 100, 513, 1000, 5000])
def test_search_on_monotone_probe(threshold):
    result = longest(lambda n: n <= threshold, start=64, step=256, limit=4096, precision=8)
    if threshold < 64:
        assert result.max_len == 0
    elif threshold >= 64 + 256 * 15:  # the sweep never fails below the limit
        assert result.max_len == 64 + 256 * 15
    else:
        assert threshold - 8 < result.max_len <= threshold


def test_search_on_non_monotone_probe():
    passes = {64, 320, 400, 410}  # fails at 576 first; 400..410 pass again inside the bracket
    result = longest(lambda n: n in passes or n < 330, start=64, step=256, limit=4096, precision=4)
    lengths = [n for n, _ in result.probes]
    assert lengths[:3] == [64, 320, 576]  # the linear sweep stops at the first failure
    assert all(n < 576 for n in lengths[3:])  # the bisection stays inside (320, 576)
    assert dict(result.probes)[result.max_len] is True


def test_parse_bytes():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("4GB") == 4 * 10**9 and parse_bytes("100") == 100
    with pytest.raises(ValueError, match="cannot read"):
        parse_bytes("lots")


MEMORY_KEYS = {
    "executor",
    "length",
    "prompt_length",
    "dtype",
    "measured",
    "peak_activation_bytes",
    "predicted_peak_activation_bytes",
    "average_activation_bytes",
    "par",
    "rss_peak_growth_bytes",
    "step_latency_s",
    "status",
    "fragmentation",
    "peak_body_bytes",
    "peak_logits_sampling_bytes",
}


@pytest.mark.slow
def test_worker_record_schema(tiny_checkpoints):
    job = {
        "model": str(tiny_checkpoints["llada"]),
        "executor": "mosaic",
        "length": 48,
        "alpha": 0.5,
        "dtype": "bf16",
        "generation": {},
        "options": {"row_chunk": 8},
    }
    record = run_job(job)
    assert record["status"] == "ok" and MEMORY_KEYS <= set(record)
    assert record["prompt_length"] == 24 and record["measured"] is True
    json.dumps(record)
    failed = run_job(job | {"length": 0})
    assert failed["status"].startswith("failed: exit code 1")


@pytest.mark.parametrize("variant", ["mask-only", "planned", "chunk-ffn-logits", "mosaic"])
def test_variants_predict_what_they_measure(variant):
    from mosaic_dllm.bench.variants import variant_options

    spec = tiny_spec("llada", ids={"mask": 317, "eos": 316})
    weights = random_weights(spec, torch.bfloat16)
    request = StepRequest.first_step(spec, 120, 0.5, GenerationConfig())
    unchunked = measure(spec, weights, "mosaic", request, {"row_chunk": 16}).plan["predicted_peak_activation_bytes"]
    budget = int(unchunked * 0.8) if variant in ("chunk-ffn-logits", "mosaic") else None
    options = variant_options([variant], row_chunk=16, budget=budget)[variant]
    kind = options.pop("kind")
    if variant == "chunk-ffn-logits":  # the tiny model's peak is in attention: FFN and logits cannot lower it
        with pytest.raises(DoesNotFit) as exc:
            measure(spec, weights, kind, request, options)
        assert exc.value.max_length < 120
        return
    measured = measure(spec, weights, kind, request, options)
    assert predict(spec, torch.bfloat16, kind, request, options).peak == measured.timeline.peak
    if budget:
        assert measured.plan["predicted_peak_activation_bytes"] <= budget


def test_unknown_variant_is_refused():
    from mosaic_dllm.bench.variants import variant_options

    with pytest.raises(ValueError, match="available: eager, mask-only"):
        variant_options(["fast"], 64)


@pytest.mark.slow
@pytest.mark.parametrize("executor", ["eager", "mosaic"])
def test_the_harness_runs_at_temperature_one(tiny_checkpoints, executor):
    """Measured and predicted at temperature 1 (the official sampler's heaviest path): the same peak."""
    job = {
        "model": str(tiny_checkpoints["llada"]),
        "executor": executor,
        "length": 96,
        "alpha": 0.5,
        "dtype": "bf16",
        "generation": {"temperature": 1.0},
        "options": {"row_chunk": 8} if executor == "mosaic" else {},
    }
    record = run_job(job)
    assert record["status"] == "ok", record["status"]
    assert record["predicted_peak_activation_bytes"] == record["peak_activation_bytes"]
    if executor == "eager":
        return  # a prediction alone at a longer length: once is enough
    predicted = run_job(job | {"measure": False, "length": 768})
    assert (
        predicted["status"] == "ok" and predicted["predicted_peak_activation_bytes"] > record["peak_activation_bytes"]
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("executor,options", [("eager", {}), ("mosaic", {"row_chunk": 7})])
def test_dream_at_temperature_one_is_predicted_from_above(dtype, executor, options):
    """Dream samples only if Categorical accepts the rows (checked by value; bf16 rows are usually
    refused and take the argmax pass). A prediction cannot know: it runs both paths, so it is at
    least what either costs, and no more than both."""
    spec = tiny_spec("dream", ids={"mask": 317, "eos": 316})
    weights = random_weights(spec, dtype)
    request = StepRequest.first_step(spec, 97, 0.5, GenerationConfig(temperature=1.0))
    measured = measure(spec, weights, executor, request, options).timeline.peak
    predicted = predict(spec, dtype, executor, request, options).peak
    assert measured <= predicted <= 2 * measured
