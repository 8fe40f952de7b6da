"""`mosaic bench memory` and `mosaic bench max-len`: jobs fanned out to worker processes, one each."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from ..memory.sizes import mib as _mib
from ..plan.search import longest


def mib(n: float | None) -> str:
    return _mib(n, unit=False)


def run_job(job: dict, timeout: float | None = None) -> dict:
    """Run one job in a fresh process; a crash (out of memory included) becomes a failed record."""
    base = {"executor": job["executor"], "length": job["length"], "measured": job.get("measure", True)}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mosaic_dllm.bench.worker", json.dumps(job)],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return base | {"status": f"failed: timed out after {timeout} s"}
    if proc.returncode != 0:
        killed = " (killed: out of memory?)" if proc.returncode < 0 or proc.returncode == 137 else ""
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        return base | {"status": f"failed: exit code {proc.returncode}{killed}: {tail[0]}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def memory_records(
    base_job: dict, lengths: list[int], executors: list[str], options: dict[str, dict], progress: Callable[[str], None]
) -> list[dict]:
    records = []
    for length in lengths:
        for executor in executors:
            job = base_job | {
                "executor": executor,
                "length": length,
                "options": options.get(executor, {}),
                "timeline": length == max(lengths),
            }
            progress(f"measuring {executor} at L={length}")
            records.append(run_job(job))
    by = {(r["executor"], r["length"]): r for r in records}
    if "eager" in executors:
        for r in records:
            ref = by.get(("eager", r["length"]))
            if r["executor"] != "eager" and ref and r.get("peak_activation_bytes") and ref.get("peak_activation_bytes"):
                r["peak_ratio_vs_eager"] = round(r["peak_activation_bytes"] / ref["peak_activation_bytes"], 4)
                r["latency_ratio_vs_eager"] = round(r["step_latency_s"] / ref["step_latency_s"], 4)
    return records


def memory_table(records: list[dict]) -> str:
    head = (
        f"{'executor':<8} {'L':>6} {'peak MiB':>9} {'pred MiB':>9} {'body':>9} {'logits':>9} {'PAR':>6} "
        f"{'RSS MiB':>8} {'frag':>6} {'arena':>8} {'arena/LB':>8} {'step s':>8} "
        f"{'peak/eager':>10} {'time/eager':>10}  status"
    )
    rows = [head]
    for r in records:
        plan = r.get("plan") or {}
        rows.append(
            f"{r['executor']:<8} {r['length']:>6} {mib(r.get('peak_activation_bytes')):>9} "
            f"{mib(r.get('predicted_peak_activation_bytes')):>9} {mib(r.get('peak_body_bytes')):>9} "
            f"{mib(r.get('peak_logits_sampling_bytes')):>9} {r.get('par', '-'):>6} "
            f"{mib(r.get('rss_peak_growth_bytes')):>8} {r.get('fragmentation', '-'):>6} "
            f"{mib(plan.get('arena_bytes')):>8} {plan.get('arena_vs_lower_bound', '-'):>8} "
            f"{r.get('step_latency_s', '-'):>8} {r.get('peak_ratio_vs_eager', '-'):>10} "
            f"{r.get('latency_ratio_vs_eager', '-'):>10}  {r['status']}"
        )
    return "\n".join(rows)


def max_len_records(
    base_job: dict,
    executors: list[str],
    options: dict[str, dict],
    budget: int,
    start: int,
    step: int,
    limit: int,
    precision: int,
    measure_up_to: int,
    progress: Callable[[str], None],
) -> list[dict]:
    out = []
    for executor in executors:
        probes: list[dict] = []

        def fits(length: int, executor: str = executor, probes: list = probes) -> bool:
            measured = length <= measure_up_to
            job = base_job | {
                "executor": executor,
                "length": length,
                "options": options.get(executor, {}),
                "measure": measured,
            }
            progress(f"{executor}: L={length} ({'measured' if measured else 'predicted'})")
            r = run_job(job)
            peak = r.get("peak_activation_bytes") if measured else r.get("predicted_peak_activation_bytes")
            ok = r["status"] == "ok" and peak is not None and peak <= budget
            probe = {
                "length": length,
                "measured": measured,
                "fits": ok,
                "peak_activation_bytes": peak,
                "status": r["status"],
            }
            if measured and r.get("predicted_peak_activation_bytes") and peak:
                probe["prediction_error"] = round(r["predicted_peak_activation_bytes"] / peak - 1, 6)
            probes.append(probe)
            return ok

        result = longest(fits, start, step, limit, precision)
        measured_ok = [p["length"] for p in probes if p["measured"]]
        out.append(
            {
                "executor": executor,
                "budget_bytes": budget,
                "max_len": result.max_len,
                "measured_up_to": max(measured_ok, default=0),
                "max_len_is": "measured" if result.max_len <= measure_up_to else "predicted",
                "probes": probes,
            }
        )
    if "eager" in executors:
        ref = next(r for r in out if r["executor"] == "eager")["max_len"]
        for r in out:
            r["ratio_vs_eager"] = round(r["max_len"] / ref, 3) if ref else None
    return out
