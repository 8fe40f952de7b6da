"""Admission by memory plan, the bounded queue, disconnects, internal errors and a concurrent load."""

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from mosaic_dllm import LLM, GenerationConfig

from .conftest import get_json, serving


def wait_for(predicate, timeout=30.0):
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, "timed out"
        time.sleep(0.02)


def test_a_request_too_big_for_the_budget_is_refused_with_the_longest_length(long_context_checkpoint):
    llm = LLM(long_context_checkpoint, memory_budget="1MiB")
    with serving(llm) as (url, _):
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 3000}, timeout=30)
        assert response.status_code == 400
        error = response.json()["error"]
        assert error["code"] == "memory_budget_exceeded" and "longest sequence" in error["message"]
        longest = error["longest_length"]
        assert 0 < longest < 3000
        fitting = httpx.post(
            f"{url}/v1/completions", json={"prompt": [5], "max_tokens": longest - 1, "steps": 1}, timeout=60
        )
        assert fitting.status_code == 200, fitting.text
        assert 'mosaic_rejections_total{reason="memory_budget"} 1.0' in httpx.get(f"{url}/metrics").text


def test_full_queue_is_429_and_a_disconnect_cancels_and_frees_memory(long_context_checkpoint):
    llm = LLM(long_context_checkpoint, memory_budget="256MiB", max_batch=1)  # one running, none may wait
    with serving(llm, max_queue=0) as (url, app):
        long_body = {
            "prompt": "Return the",
            "max_tokens": 2048,
            "steps": 2048,
            "stream": True,
            "stream_options": {"denoising": True},
        }
        with httpx.stream("POST", f"{url}/v1/completions", json=long_body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["denoising"]["step"] == 1  # running now
            busy = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=30)
            assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "queue_full"
        # The client closed the stream mid-generation: the engine stops at its next step.
        wait_for(lambda: not get_json(f"{url}/health")["running"])
        health = get_json(f"{url}/health")
        assert health["arena_committed_bytes"] == 0 and health["waiting"] == 0
        after = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8, "steps": 4}, timeout=60)
        assert after.status_code == 200
        assert 'mosaic_rejections_total{reason="client_disconnected"} 1.0' in httpx.get(f"{url}/metrics").text


def test_an_internal_error_fails_that_request_only(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llada"])
    with serving(llm) as (url, app):
        real = llm.executor.batch_logits
        broken = threading.Event()

        def failing(*args, **kwargs):
            if not broken.is_set():
                broken.set()
                raise RuntimeError("simulated kernel failure")
            return real(*args, **kwargs)

        llm.executor.batch_logits = failing
        response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=60)
        assert response.status_code == 500 and "simulated kernel failure" in response.json()["error"]["message"]
        ok = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8}, timeout=60)
        assert ok.status_code == 200


def test_concurrent_load_every_request_gets_exactly_one_answer(tiny_checkpoints):
    """32 requests from 8 clients run batched; each plain completion equals the same request alone."""
    llm = LLM(tiny_checkpoints["llada"], memory_budget="64MiB")
    texts = {}
    with serving(llm, max_queue=32) as (url, _):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def one(i: int) -> str:
            kind = i % 3
            extra = {"steps": 8, "seed": i}
            if kind == 0:
                out = client.completions.create(model=None, prompt=f"Item {i}", max_tokens=16, extra_body=extra)
                texts[i] = out.choices[0].text
                return out.id
            if kind == 1:
                chunks = list(
                    client.completions.create(
                        model=None, prompt=f"Item {i}", max_tokens=16, stream=True, extra_body=extra
                    )
                )
                assert chunks[-1].choices[0].finish_reason in ("stop", "length")
                return chunks[0].id
            messages = [{"role": "user", "content": f"Item {i}"}]
            return client.chat.completions.create(model=None, messages=messages, max_tokens=16, extra_body=extra).id

        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(one, range(32)))
        assert len(set(ids)) == 32
        metrics = httpx.get(f"{url}/metrics").text
        assert "mosaic_generated_tokens_total 512.0" in metrics
        assert "mosaic_batch_requests" in metrics and "mosaic_batch_tokens" in metrics
        assert "mosaic_step_latency_seconds_count" in metrics
    alone = LLM(tiny_checkpoints["llada"], memory_budget="64MiB", max_batch=1)
    for i, text in texts.items():
        assert text == alone.generate(f"Item {i}", GenerationConfig(gen_length=16, steps=8, seed=i))[0].text
