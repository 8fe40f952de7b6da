"""Tries bad input as a new user and as an attacker would, on the CLI and on a `mosaic serve` on
loopback (the default model), and counts what happens:

    python -m tests.fault_sweep            # every case (a few minutes: each CLI case is a process)

clear error: the CLI exits 2 with one `error:` line; HTTP answers 4xx in OpenAI's error shape.
traceback / 500: a traceback, any other exit code, a 5xx, a malformed error body or a hang.
silently accepted: a case that should be refused ran. Valid cases are in the sweep too (they must
run); a refusal of one counts as "valid refused".
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass

import httpx

from tests.processes import REPO, mosaic_serve

DEFAULT_MODEL = REPO / "mosaic_dllm" / "assets" / "default_model"
OK, CLEAR, CRASH, SILENT, REFUSED = "ok", "clear error", "traceback / 500", "silently accepted", "valid refused"


@dataclass(frozen=True)
class Case:
    name: str
    request: list | dict | bytes | tuple  # CLI argv | JSON body | raw body | (method, path)
    bad: bool = True  # should be refused
    path: str = "/v1/completions"


GEN = ["generate", "--no-progress", "--gen-length", "16", "--steps", "4", "--prompt"]
CLI_CASES = [
    Case("seed beyond 64 bits", [*GEN, "Return the", "--seed", "99999999999999999999999"]),
    Case("negative seed", [*GEN, "Return the", "--seed", "-1"]),
    Case("gen length 0", ["generate", "--no-progress", "--prompt", "hi", "--gen-length", "0"]),
    Case("gen length 1e8", ["generate", "--no-progress", "--prompt", "hi", "--gen-length", "100000000"]),
    Case("steps 1e9", [*GEN[:-3], "--steps", "1000000000", "--prompt", "hi"]),
    Case("temperature nan", [*GEN, "hi", "--temperature", "nan"]),
    Case("temperature inf", [*GEN, "hi", "--temperature", "inf"]),
    Case("temperature -1", [*GEN, "hi", "--temperature", "-1"]),
    Case("Dream-only top_p on LLaDA", [*GEN, "hi", "--top-p", "0.5"]),
    Case("cuda without a GPU", [*GEN, "hi", "--device", "cuda"]),
    Case("unknown device", [*GEN, "hi", "--device", "banana"]),
    Case("memory budget 0", [*GEN, "hi", "--memory-budget", "0"]),
    Case("memory budget text", [*GEN, "hi", "--memory-budget", "lots"]),
    Case("unknown dtype", [*GEN, "hi", "--dtype", "fp8"]),
    Case("missing model", [*GEN, "hi", "--model", "/nonexistent/model"]),
    Case("empty prompt", [*GEN, ""]),
    Case("invalid UTF-8 prompt", [*GEN, os.fsdecode(b"Return \xff\xfe the")]),
    Case("prompt past the context", [*GEN, "word " * 20000]),
    Case("block not dividing", [*GEN, "hi", "--block-length", "5"]),
    Case("row chunk 0", [*GEN, "hi", "--row-chunk", "0"]),
    Case("budget with eager", [*GEN, "hi", "--executor", "eager", "--memory-budget", "1GiB"]),
    Case("Dream alg on LLaDA", [*GEN, "hi", "--alg", "entropy"]),
    Case("serve on port 99999", ["serve", "--port", "99999"]),
    Case("serve with a 10-byte body limit", ["serve", "--max-body", "10"]),
    Case("serve on a taken port", ["serve", "--port", "{taken}"]),
    Case("train 0 steps", ["train", "--steps", "0", "--out", "{fresh}"]),
    Case("train without --out", ["train", "--steps", "1"]),
    Case("train over the shipped model", ["train", "--steps", "1", "--out", str(DEFAULT_MODEL)]),
    Case("bench lengths abc", ["bench", "memory", "--preset", "llada-8b", "--lengths", "abc"]),
    Case("plan length 1", ["plan", "--preset", "llada-8b", "--length", "1"]),
    Case("plan unknown preset", ["plan", "--preset", "gpt-9", "--length", "100"]),
    Case("info of nothing", ["info", "/nonexistent/model"]),
    Case("plan budget 1e999GiB", ["plan", "--preset", "llada-8b", "--length", "64", "--budget", "1e999GiB"]),
    Case("plan rows past the length", ["plan", "--preset", "llada-8b", "--length", "64", "--rows", "65"]),
    Case("plan zero layers", ["plan", "--preset", "llada-8b", "--layers", "0", "--length", "64"]),
    Case("bench max-len budget 0", ["bench", "max-len", "--preset", "llada-8b", "--budget", "0"]),
    Case("serve with 0 connections", ["serve", "--max-connections", "0"]),
    Case("serve with a negative header timeout", ["serve", "--header-timeout", "-1"]),
    Case("int4 groups of 128 on 192-wide layers", [*GEN, "hi", "--quantize", "int4-g128"]),
    Case("quantize the head of unquantized weights", [*GEN, "hi", "--quantize-head"]),
    Case("an unknown quantization", [*GEN, "hi", "--quantize", "int3"]),
    Case("int8 cache without a cache", [*GEN, "hi", "--cache-dtype", "int8"]),
    Case("a GGUF file that is not one", [*GEN, "hi", "--model", "{junk_gguf}"]),
    Case("a parallel executor on one process", [*GEN, "hi", "--executor", "sequence-parallel"]),
    Case("serve across ranks", ["serve", "--executor", "tensor-parallel"]),
    Case("valid quantized generate", [*GEN, "Return the", "--quantize", "int8"], bad=False),
    Case("valid generate", [*GEN, "Return the number of"], bad=False),
    Case(
        "max tokens 24, nothing else", ["generate", "--no-progress", "--prompt", "hi", "--gen-length", "24"], bad=False
    ),
    Case("valid plan", ["plan", "--preset", "llada-8b", "--layers", "1", "--length", "512"], bad=False),
]

C = {"prompt": "Return the", "max_tokens": 16, "steps": 4}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 16, "steps": 4}
HTTP_CASES = [
    Case("temperature as a string", C | {"temperature": "0.5"}),
    Case("max_tokens as a bool", C | {"max_tokens": True}),
    Case("stream as a string", C | {"stream": "yes"}),
    Case("stop_at_eos as a string", C | {"stop_at_eos": "yes"}),
    Case("temperature NaN", b'{"prompt": "hi", "max_tokens": 16, "temperature": NaN}'),
    Case("temperature Infinity", b'{"prompt": "hi", "max_tokens": 16, "temperature": Infinity}'),
    Case("top_p 1e999", b'{"prompt": "hi", "max_tokens": 16, "top_p": 1e999}'),
    Case("seed 2**70", C | {"seed": 2**70}),
    Case("seed -1", C | {"seed": -1}),
    Case("steps 1e9", C | {"steps": 10**9}),
    Case("steps 1e12", C | {"steps": 10**12}),
    Case("max_tokens 1e9", C | {"max_tokens": 10**9}),
    Case("max_tokens 0", C | {"max_tokens": 0}),
    Case("lone surrogate", b'{"prompt": "Return \\ud800 the", "max_tokens": 16, "steps": 4}'),
    Case("empty prompt", C | {"prompt": ""}),
    Case("empty token list", C | {"prompt": []}),
    Case("token id 1e12", C | {"prompt": [10**12]}),
    Case("token id -1", C | {"prompt": [-1]}),
    Case("unknown field", C | {"temprature": 1.0}),
    Case("n = 2", C | {"n": 2}),
    Case("unknown model", C | {"model": "gpt-9"}),
    Case("block not dividing", C | {"block_length": 5}),
    Case("cfg_scale -1", C | {"cfg_scale": -1}),
    Case("Dream alg on LLaDA", C | {"alg": "entropy"}),
    Case("cache_dtype int8 without a cache", C | {"cache_dtype": "int8"}),
    Case("cache_dtype fp8", C | {"cache_dtype": "fp8", "cache": "dual", "block_length": 8}),
    Case("top_k -1", C | {"top_k": -1}),
    Case("frequency_penalty 0.5", C | {"frequency_penalty": 0.5}),
    Case("logprobs 5", C | {"logprobs": 5}),
    Case("five stop strings", C | {"stop": ["a", "b", "c", "d", "e"]}),
    Case("stream_options without stream", C | {"stream_options": {"include_usage": True}}),
    Case(
        "an image content part",
        CHAT | {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        path="/v1/chat/completions",
    ),
    Case(  # the default model has no chat template: a clear 400 (tests/server cover chat with one)
        "developer role and text parts, to a model without a chat template",
        CHAT | {"messages": [{"role": "developer", "content": [{"type": "text", "text": "hi"}]}]},
        path="/v1/chat/completions",
    ),
    Case("what clients send by default", C | {"top_p": 1, "frequency_penalty": 0, "logprobs": None}, bad=False),
    Case("stop strings", C | {"stop": ["\n", "."]}, bad=False),
    Case("top_k 0 on LLaDA (off: a no-op)", C | {"top_k": 0}, bad=False),
    Case("top_p null on LLaDA (off: a no-op)", C | {"top_p": None}, bad=False),
    Case("unknown stream option", C | {"stream": True, "stream_options": {"colour": True}}),
    Case("not JSON", b"prompt=hi"),
    Case("a JSON array", b"[1, 2, 3]"),
    Case("10 MB body", json.dumps({"prompt": "word " * 2_000_000, "max_tokens": 8}).encode()),
    Case("1 MB prompt", {"prompt": "x" * 1_000_000, "max_tokens": 8}),
    Case("past the context", C | {"max_tokens": 4096}),
    Case("chat without messages", CHAT | {"messages": []}, path="/v1/chat/completions"),
    Case("chat bad role", CHAT | {"messages": [{"role": "robot", "content": "hi"}]}, path="/v1/chat/completions"),
    Case("chat no content", CHAT | {"messages": [{"role": "user"}]}, path="/v1/chat/completions"),
    Case("unknown route", ("GET", "/v1/nothing")),
    Case("wrong method", ("DELETE", "/v1/completions")),
    Case("valid completion", C, bad=False),
    Case("max_tokens 24, nothing else", {"prompt": "Return the", "max_tokens": 24}, bad=False),
    Case("chat to a model without a chat template", CHAT, path="/v1/chat/completions"),
    Case("valid stream", C | {"stream": True, "stream_options": {"denoising": True}}, bad=False),
]


def classify(bad: bool, refused: bool | None) -> str:
    """refused: True (a clear refusal), False (it ran), None (a crash)."""
    if refused is None:
        return CRASH
    if refused:
        return CLEAR if bad else REFUSED
    return SILENT if bad else OK


def junk_gguf() -> str:
    """A file with GGUF's magic and nothing valid after it."""
    path = tempfile.mkdtemp() + "/junk.gguf"
    with open(path, "wb") as f:
        f.write(b"GGUF" + bytes(range(60)))
    return path


def run_cli(case: Case, taken_port: int, timeout: float = 300) -> str:
    fill = {"{taken}": lambda: str(taken_port), "{fresh}": lambda: tempfile.mkdtemp() + "/m", "{junk_gguf}": junk_gguf}
    argv = [fill[a]() if a in fill else a for a in case.request]
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "mosaic_dllm.cli", *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
    except subprocess.TimeoutExpired:
        return classify(case.bad, None)
    if "Traceback" in proc.stderr or proc.returncode not in (0, 2):
        return classify(case.bad, None)
    if proc.returncode == 2:
        lines = [line for line in proc.stderr.splitlines() if line.startswith("error:") or ": error:" in line]
        return classify(case.bad, True if lines else None)
    return classify(case.bad, False)


def run_http(case: Case, url: str) -> str:
    try:
        if isinstance(case.request, tuple):
            r = httpx.request(case.request[0], url + case.request[1], timeout=60)
        elif isinstance(case.request, bytes):
            r = httpx.post(
                url + case.path, content=case.request, headers={"content-type": "application/json"}, timeout=60
            )
        else:
            r = httpx.post(url + case.path, json=case.request, timeout=60)
    except httpx.HTTPError:
        return classify(case.bad, None)
    if r.status_code >= 500:
        return classify(case.bad, None)
    if r.status_code >= 400:
        try:
            error = r.json()["error"]
            shaped = all(k in error for k in ("message", "type", "param", "code")) and bool(error["message"])
        except (ValueError, KeyError, TypeError):
            shaped = False
        return classify(case.bad, True if shaped else None)
    return classify(case.bad, False)


def sweep(cli_cases=CLI_CASES, http_cases=HTTP_CASES, show=print) -> dict[str, Counter]:
    counts = {"cli": Counter(), "http": Counter()}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        for case in cli_cases:
            outcome = run_cli(case, taken.getsockname()[1])
            counts["cli"][outcome] += 1
            show(f"cli   {outcome:<18} {case.name}")
    if http_cases:
        with mosaic_serve(None) as (url, _):
            for case in http_cases:
                outcome = run_http(case, url)
                counts["http"][outcome] += 1
                show(f"http  {outcome:<18} {case.name}")
    return counts


def table(counts: dict[str, Counter]) -> str:
    columns = ("tried", "ok", CLEAR, REFUSED, CRASH, SILENT)
    head = f"{'':<6}" + "".join(f"{c:>{len(c) + 3}}" for c in columns)
    rows = [head]
    for kind, c in counts.items():
        values = (sum(c.values()), c[OK], c[CLEAR], c[REFUSED], c[CRASH], c[SILENT])
        rows.append(f"{kind:<6}" + "".join(f"{v:>{len(col) + 3}}" for v, col in zip(values, columns, strict=True)))
    return "\n".join(rows)


if __name__ == "__main__":
    print(table(sweep()))
