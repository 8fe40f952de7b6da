"""Serving throughput, batched vs one request at a time, in one run; every answer checked against
the same request run alone.

For each `--max-batch` setting (default: 1, then 16) it starts `mosaic serve` on loopback, and for
each concurrency N runs N clients that each send `--per-client` requests back to back (completions,
streamed completions and chat completions in turn, each with its own seed, half of them sampled at
temperature 0.7), and records generated tokens/s, requests/s and latency percentiles. Answers are
keyed by request: every setting must give the same text and finish reason for every request
(the first setting, `--max-batch 1`, is "alone"). Lost requests and errors are counted, never
retried.

    python benchmarks/serve_throughput.py --concurrency 1 4 16 64 \\
        --out benchmarks/results/serve_throughput_default.json
    python benchmarks/serve_throughput.py --preset llada-8b --layers 2 --prompt-tokens 64 256 \\
        --gen 64 --steps 8 --block 64 --concurrency 1 4 8 --per-client 1 \\
        --out benchmarks/results/serve_throughput_llada8b.json

With `--preset`, a random checkpoint of that preset (its dims, `--layers` layers, a byte-level
tokenizer-free vocabulary) is written to a temporary directory first; prompts are then token ids
of the lengths in `--prompt-tokens`.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

PROMPTS = ["Return the number of", "Create a new", "Set the value of", "Raise an error if the", "Open the file"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, flags: list[str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "mosaic_dllm.cli", "serve", "--port", str(port), "--max-queue", "512", *flags]
    if model:
        cmd += ["--model", model]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mosaic serve exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("mosaic serve did not become ready")


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def request_body(i: int, args, prompt_ids: list[list[int]] | None, chat: bool = True) -> tuple[str, dict]:
    """(route, body) of request i: the kind rotates (chat only where the model has a template),
    seeds and temperatures vary by i."""
    settings = {"max_tokens": args.gen, "steps": args.steps, "block_length": args.block, "seed": i}
    if i % 2:
        settings["temperature"] = 0.7
    prompt = prompt_ids[i % len(prompt_ids)] if prompt_ids else f"{PROMPTS[i % len(PROMPTS)]} item {i}"
    kind = i % 3 if prompt_ids is None and chat else i % 2  # token-id prompts, or no chat template: no chat
    if kind == 2:
        return "/v1/chat/completions", settings | {"messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", settings | {"prompt": prompt, "stream": kind == 1}


def send(client: httpx.Client, url: str, route: str, body: dict) -> tuple[str, str, int]:
    """(text, finish_reason, completion tokens) of one request; raises on any failure."""
    if body.get("stream"):
        text, finish, tokens = [], None, 0
        body = body | {"stream_options": {"include_usage": True}}
        with client.stream("POST", url + route, json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                for choice in chunk.get("choices", []):
                    text.append(choice.get("text") or "")
                    finish = choice.get("finish_reason") or finish
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
        return "".join(text), finish, tokens
    response = client.post(url + route, json=body)
    response.raise_for_status()
    out = response.json()
    choice = out["choices"][0]
    text = choice["message"]["content"] if "message" in choice else choice["text"]
    return text, choice["finish_reason"], out["usage"]["completion_tokens"]


def run_load(url: str, concurrency: int, args, prompt_ids) -> tuple[dict, dict]:
    total = concurrency * args.per_client
    answers: dict[int, tuple[str, str]] = {}
    latencies, tokens, errors = [], 0, []
    chat = httpx.get(url + "/v1/models", timeout=60).json()["data"][0].get("chat", True)

    def client_loop(c: int) -> None:
        nonlocal tokens
        with httpx.Client(timeout=3600) as client:
            for k in range(args.per_client):
                i = c * args.per_client + k
                route, body = request_body(i, args, prompt_ids, chat)
                start = time.perf_counter()
                try:
                    text, finish, n = send(client, url, route, body)
                except Exception as exc:  # counted, never retried
                    errors.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                latencies.append(time.perf_counter() - start)
                answers[i] = (text, finish)
                tokens += n

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(client_loop, range(concurrency)))
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 3) if latencies else float("nan")

    row = {
        "concurrency": concurrency,
        "requests": total,
        "answered": len(answers),
        "lost": total - len(answers) - len(errors),
        "errors": len(errors),
        "error_samples": errors[:3],
        "seconds": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 1),  # answer tokens (up to and including EOS)
        "decoded_per_s": round(len(answers) * args.gen / wall, 1),  # canvas positions decoded
        "requests_per_s": round(len(answers) / wall, 2),
        "p50": pct(0.5),
        "p90": pct(0.9),
        "p99": pct(0.99),
        "mean": round(statistics.fmean(latencies), 3) if latencies else None,
    }
    return row, answers


def random_checkpoint(preset_name: str, layers: int) -> str:
    import torch

    from mosaic_dllm.bench.presets import preset
    from mosaic_dllm.checkpoint import save
    from mosaic_dllm.models.weights import random_state_dict

    spec = preset(preset_name, layers)
    path = tempfile.mkdtemp(prefix=f"{preset_name}-{layers}l-")
    ids = {"mask_token_id": spec.mask_token_id, "eos_token_id": list(spec.eos_token_ids)}  # no tokenizer here
    save(Path(path), spec, random_state_dict(spec, torch.bfloat16, seed=0, std=0.02), generation_config=ids)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint directory (default: the embedded default model)")
    parser.add_argument("--preset", help="a random checkpoint of this preset instead (e.g. llada-8b)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--prompt-tokens", type=int, nargs="*", help="with --preset: prompt lengths in tokens")
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block", type=int, default=8)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--per-client", type=int, default=4, help="requests each client sends, one after another")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16], help="--max-batch settings; first = alone")
    parser.add_argument("--serve-flags", nargs="*", default=[], help="more `mosaic serve` flags (e.g. --memory-budget)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model = random_checkpoint(args.preset, args.layers) if args.preset else args.model
    prompt_ids = None
    if args.preset:
        lengths = args.prompt_tokens or [64, 256]
        prompt_ids = [[(7 * i + 13 * n) % 1000 + 10 for i in range(n)] for n in lengths]
    record = {"model": args.preset and f"{args.preset} ({args.layers} layers, random)" or args.model or "default"}
    record |= {"gen": args.gen, "steps": args.steps, "block": args.block, "per_client": args.per_client}
    record |= {"cpus": os.cpu_count(), "runs": []}
    reference: dict[int, tuple[str, str]] = {}  # request i's first answer (under --max-batch 1)
    mismatches = compared = 0
    for max_batch in args.batches:
        proc, url = start_server(model, ["--max-batch", str(max_batch), *args.serve_flags])
        try:
            run_load(url, 1, args, prompt_ids)  # warm-up: plans, first-call costs
            for concurrency in args.concurrency:
                row, answers = run_load(url, concurrency, args, prompt_ids)
                for i, answer in answers.items():  # request i is the same request at every setting
                    if i in reference:
                        compared += 1
                        mismatches += reference[i] != answer
                    else:
                        reference[i] = answer
                row["max_batch"] = max_batch
                record["runs"].append(row)
                print(json.dumps(row), flush=True)
            health = httpx.get(f"{url}/health").json()
            record.setdefault("budgets", {})[max_batch] = health.get("memory_budget_bytes")
        finally:
            stop_server(proc)
    record["answers_compared_with_alone"] = compared
    record["answers_differing_from_alone"] = mismatches
    alone = {r["concurrency"]: r for r in record["runs"] if r["max_batch"] == args.batches[0]}
    for r in record["runs"]:
        base = alone.get(r["concurrency"])
        if base and r["max_batch"] != args.batches[0] and base["tokens_per_s"]:
            r["tokens_per_s_vs_alone"] = round(r["tokens_per_s"] / base["tokens_per_s"], 2)
    print(json.dumps({k: v for k, v in record.items() if k != "runs"}))
    if args.out:
        args.out.write_text(json.dumps(record, indent=1) + "\n")


if __name__ == "__main__":
    main()
