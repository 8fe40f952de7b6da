"""A bounded concurrent load against a running `mosaic serve`, through the official `openai` client.

    mosaic serve --port 8000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 32 --clients 8

Mixes completions, streamed completions and chat completions; prints requests, failures (by
error), and latency percentiles (seconds from sending to the last byte).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import openai

PROMPTS = ["Return the number of", "Create a new", "Set the value of", "Raise an error if the"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="unused", max_retries=0, timeout=600)
    model = client.models.list().data[0].id
    extra = {"steps": args.steps, "block_length": 8}

    def one(i: int) -> tuple[float, str]:
        start = time.perf_counter()
        prompt = PROMPTS[i % len(PROMPTS)]
        try:
            if i % 3 == 0:
                client.completions.create(model=model, prompt=prompt, max_tokens=args.max_tokens, extra_body=extra)
            elif i % 3 == 1:
                stream = client.completions.create(
                    model=model, prompt=prompt, max_tokens=args.max_tokens, stream=True, extra_body=extra
                )
                assert [c for c in stream][-1].choices[0].finish_reason in ("stop", "length")
            else:
                messages = [{"role": "user", "content": prompt}]
                client.chat.completions.create(
                    model=model, messages=messages, max_tokens=args.max_tokens, extra_body=extra
                )
            return time.perf_counter() - start, "ok"
        except Exception as exc:  # counted, not raised: the point is how many fail and why
            return time.perf_counter() - start, type(exc).__name__

    started = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - started
    latencies = sorted(t for t, status in results if status == "ok")
    outcomes = Counter(status for _, status in results)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] if latencies else float("nan")

    summary = {
        "requests": args.requests,
        "clients": args.clients,
        "ok": outcomes.pop("ok", 0),
        "failures": dict(outcomes),
        "wall_seconds": round(wall, 2),
        "latency_s": {
            "p50": round(pct(50), 3),
            "p90": round(pct(90), 3),
            "p99": round(pct(99), 3),
            "max": round(max(latencies, default=float("nan")), 3),
            "mean": round(statistics.mean(latencies), 3) if latencies else None,
        },
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
