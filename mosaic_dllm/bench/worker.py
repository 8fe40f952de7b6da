"""Runs one measurement in its own process: `python -m mosaic_dllm.bench.worker '<json job>'`.

A process per measurement means running out of memory ends that measurement only; the parent
reports it as a failure at that length. The last stdout line is the JSON record.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace

import torch

from .. import checkpoint
from ..config import GenerationConfig
from ..models.quantized import check_shapes, parse_quantization
from ..models.weights import Weights
from ..plan.search import DoesNotFit
from .presets import preset
from .step import StepRequest, measure, predict, random_weights

DOES_NOT_FIT = "does not fit"  # a probe's status when no plan fits the budget: a result, not a failure


def failed(record: dict) -> bool:
    """Whether a probe failed (crashed, timed out): anything but "ok" and "does not fit"."""
    return record["status"] != "ok" and not record["status"].startswith(DOES_NOT_FIT)


def load_model(job: dict) -> tuple:
    dtype = checkpoint.parse_dtype(job["dtype"]) or torch.bfloat16
    scheme = parse_quantization(
        job.get("quantize"), job.get("quantize_head", False), job.get("quantize_embeddings", False)
    )
    if job.get("model"):
        ck = checkpoint.load(job["model"], dtype=dtype, device=job.get("device", "cpu"), quantization=scheme)
        return ck.spec, ck.weights, dtype
    spec = preset(job["preset"], job.get("layers"))
    if scheme is not None:
        check_shapes(spec, scheme)
        spec = replace(spec, quantization=scheme)  # random weights quantized as they are made
    return spec, None, dtype


def run(job: dict) -> dict:
    spec, weights, dtype = load_model(job)
    settings = GenerationConfig.from_dict(job["generation"])
    request = StepRequest.first_step(spec, job["length"], job["alpha"], settings)
    options = dict(job.get("options", {}))
    kind = options.pop("kind", job["executor"])  # a variant's executor class
    record = {
        "executor": job["executor"],
        "length": job["length"],
        "prompt_length": request.prompt_length,
        "dtype": str(dtype).removeprefix("torch."),
        "options": options,
    }
    try:
        predicted = predict(spec, dtype, kind, request, options)
        record["predicted_peak_activation_bytes"] = predicted.peak
    except NotImplementedError as exc:
        record["predicted_peak_activation_bytes"] = None
        record["prediction_note"] = str(exc)
    except DoesNotFit as exc:  # the budget search found no chunking that fits: nothing to run
        return record | {"measured": False, "status": f"{DOES_NOT_FIT}: {exc}"}
    if not job.get("measure", True):
        return record | {"measured": False, "status": "ok"}
    weights = weights if isinstance(weights, Weights) else random_weights(spec, dtype, job.get("device", "cpu"))
    m = measure(spec, weights, kind, request, options)
    body, logits_phase = m.timeline.split(spec.vocab_size)
    return record | {
        "measured": True,
        "status": "ok",
        "peak_activation_bytes": m.timeline.peak,
        "average_activation_bytes": round(m.timeline.average),
        "par": round(m.timeline.par, 3),
        "peak_body_bytes": body,
        "peak_logits_sampling_bytes": logits_phase,
        "rss_peak_growth_bytes": m.rss_growth_bytes,
        "fragmentation": round(m.rss_growth_bytes / m.timeline.peak, 3) if m.timeline.peak else None,
        "step_latency_s": round(m.seconds, 4),
        "timeline": [m.timeline.planned_bytes + r.live_bytes for r in m.timeline.records]
        if job.get("timeline")
        else None,
        "plan": m.plan,
    }


def main() -> None:
    job = json.loads(sys.argv[1])
    print(json.dumps(run(job)))


if __name__ == "__main__":
    main()
