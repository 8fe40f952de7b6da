"""The server against the official `openai` client and raw HTTP: shapes, streaming, every bad input."""

import json
import socket
import time

import httpx
import openai
import pytest

from mosaic_dllm import LLM

from .conftest import get_json, serving


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_health_and_metrics(server):
    url, _ = server
    assert [m.id for m in client(url).models.list().data] == ["tiny-llada"]
    health = get_json(f"{url}/health")
    assert health["status"] == "ok" and health["admission"] == "by memory plan"
    assert health["memory_budget_bytes"] == 64 << 20
    metrics = httpx.get(f"{url}/metrics").text
    assert "mosaic_queue_length" in metrics and "mosaic_memory_budget_bytes 6.7108864e+07" in metrics
    stats = get_json(f"{url}/stats")  # the page's gauges
    assert stats["memory_budget_bytes"] == 64 << 20 and stats["max_batch"] == 16 and stats["rss_bytes"] > 0
    assert {"running", "waiting", "batch_sequences", "batch_tokens", "planned_bytes", "arena_committed_bytes"} <= set(
        stats
    )
    page = httpx.get(f"{url}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert not any(ref in page.text for ref in ('src="http', "src='http", 'href="http', "@import", "//cdn"))  # offline


def test_denoising_events_carry_every_cell_and_the_admission(server):
    url, _ = server
    body = {"prompt": "The quick", "max_tokens": 8, "steps": 4, "stream": True, "stream_options": {"denoising": True}}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        chunks = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]
    steps = [c["denoising"] for c in chunks if "denoising" in c]
    assert [s["step"] for s in steps] == [1, 2, 3, 4] and all(len(s["cells"]) == 8 for s in steps)
    assert [sum(c is None for c in s["cells"]) for s in steps] == [6, 4, 2, 0]
    admission = steps[0]["admission"]
    assert admission["budget_bytes"] == 64 << 20 and 0 < admission["predicted_peak_bytes"] <= 64 << 20
    assert admission["chunks"]["logits_rows"] >= 1 and admission["waited_for_memory"] is False
    assert "admission" not in steps[1]


def test_completion_round_trip_matches_the_engine(server, tiny_checkpoints):
    url, app = server
    result = client(url).completions.create(
        model="tiny-llada", prompt="The quick", max_tokens=8, extra_body={"steps": 4, "seed": 3}
    )
    direct = app.state.llm.generate("The quick", app.state.llm.default_config(gen_length=8, steps=4, seed=3))[0]
    assert result.object == "text_completion" and result.choices[0].text == direct.text
    assert result.usage.completion_tokens == len(direct.token_ids) and result.usage.prompt_tokens > 0
    assert result.choices[0].finish_reason in ("stop", "length")
    settings = result.model_extra["settings"]  # every setting as resolved for this request
    assert settings["gen_length"] == 8 and settings["steps"] == 4 and settings["block_length"] == 8
    assert settings["remasking"] == "low_confidence" and settings["temperature"] == 0.0
    assert "weights" not in settings  # only quantized weights are labelled in a response


def test_fast_dllm_settings_round_trip_and_count_forward_passes(server):
    """threshold and a cache as request fields; the model card says they approximate the official
    sampler; /metrics counts forward passes next to generated tokens."""
    url, app = server
    card = get_json(f"{url}/v1/models")["data"][0]
    assert "approximation of the official sampler" in card["decoding"]["approximations"]["cache"]
    assert card["weights"] == app.state.llm.info.weights == str(app.state.llm.executor.dtype).removeprefix("torch.")
    before = app.state.llm  # the same engine answers directly
    result = client(url).completions.create(
        model="tiny-llada",
        prompt="The quick",
        max_tokens=8,
        extra_body={"steps": 8, "block_length": 4, "threshold": 0.05, "cache": "dual", "seed": 3},
    )
    cfg = before.default_config(gen_length=8, steps=8, block_length=4, threshold=0.05, cache="dual", seed=3)
    direct = before.generate("The quick", cfg)[0]
    assert result.choices[0].text == direct.text and result.model_extra["settings"]["cache"] == "dual"
    metrics = httpx.get(f"{url}/metrics").text
    passes = next(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("mosaic_forward_passes_total")
    )
    assert passes >= direct.forward_passes


def test_chat_round_trip(server):
    url, _ = server
    result = client(url).chat.completions.create(
        model="tiny-llada",
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
        max_tokens=8,
        extra_body={"steps": 8, "block_length": 4},
    )
    assert result.object == "chat.completion" and result.choices[0].message.role == "assistant"
    assert isinstance(result.choices[0].message.content, str)


def test_streaming_sends_the_finished_text_as_chunks(server):
    url, _ = server
    kw = dict(model="tiny-llada", prompt="Return the", max_tokens=8, extra_body={"steps": 4, "seed": 1})
    chunks = list(client(url).completions.create(stream=True, **kw))
    whole = client(url).completions.create(**kw)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_chat_streaming_with_usage(server):
    url, _ = server
    chunks = list(
        client(url).chat.completions.create(
            model="tiny-llada",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"steps": 4},
        )
    )
    assert chunks[0].object == "chat.completion.chunk" and chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].usage.completion_tokens == 8


def test_denoising_events_show_the_canvas_filling_in(server):
    url, _ = server
    body = {"prompt": "Return the", "max_tokens": 8, "steps": 8, "stream": True, "stream_options": {"denoising": True}}
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    steps = [json.loads(e)["denoising"] for e in events[:-1] if "denoising" in json.loads(e)]
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert [s["masked"] for s in steps] == list(range(7, -1, -1))  # one token revealed per step
    assert steps[0]["text"].count("\u2591") == 7 and "\u2591" not in steps[-1]["text"]


@pytest.mark.parametrize(
    "body,status,needle",
    [
        ({"prompt": "hi", "max_tokens": 8, "bogus": 1}, 422, "bogus"),
        ({"prompt": "hi", "max_tokens": "many"}, 422, "max_tokens"),
        ({"prompt": "hi", "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": "hi", "temperature": -1}, 422, "temperature"),
        ({"prompt": "hi", "n": 2}, 400, "one choice per request"),
        ({"max_tokens": 8}, 422, "prompt"),
        ({"prompt": "   "}, 422, "empty"),
        ({"prompt": [], "max_tokens": 8}, 422, "empty"),
        ({"prompt": [10**9], "max_tokens": 8}, 400, "outside the vocabulary"),
        ({"prompt": "hi", "max_tokens": 8, "block_length": 4, "steps": 3}, 400, "steps"),
        ({"prompt": "hi", "max_tokens": 8, "block_length": 3}, 400, "block_length"),
        ({"prompt": "hi", "max_tokens": 8, "alg": "entropy"}, 400, "Dream"),
        ({"prompt": "hi", "max_tokens": 8, "remasking": "sometimes"}, 422, "remasking"),
        ({"prompt": "hi", "max_tokens": 8, "model": "gpt-4"}, 404, "not served here"),
        ({"prompt": "hi " * 300, "max_tokens": 8}, 400, "context"),
        ({"prompt": "hi", "max_tokens": 256}, 400, "context"),
        ({"prompt": "hi", "max_tokens": 8, "threshold": 1.5}, 422, "threshold"),
        ({"prompt": "hi", "max_tokens": 8, "cache": "full"}, 422, "cache"),
        ({"prompt": "hi", "max_tokens": 8, "threshold": 0.9, "factor": 1.0}, 400, "not both"),
        ({"prompt": "hi", "max_tokens": 8, "cache": "dual", "cfg_scale": 1.0}, 400, "classifier-free guidance"),
    ],
)
def test_bad_requests_get_clear_errors(server, body, status, needle):
    url, _ = server
    response = httpx.post(f"{url}/v1/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    message = response.json()["error"]["message"]
    assert needle in message


def test_bad_chat_requests(server):
    url, _ = server
    for body, status in [
        ({"messages": []}, 422),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 422),
        ({"messages": [{"role": "user"}]}, 422),
        ({"messages": [{"role": "user", "content": "  "}]}, 400),
    ]:
        assert httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code == status


def test_openai_client_sees_errors_as_exceptions(server):
    url, _ = server
    with pytest.raises(openai.BadRequestError, match="steps"):
        client(url).completions.create(
            model="tiny-llada", prompt="hi", max_tokens=8, extra_body={"steps": 3, "block_length": 4}
        )


def test_the_fields_real_clients_send_work_through_the_openai_client(server):
    """Values that change nothing are accepted for every family (top_p 1, penalties 0, logprobs
    null); stop strings cut the answer; max_completion_tokens, the developer role and content-part
    arrays work; a value that would change the answer is refused with the field named."""
    url, _ = server
    c = client(url)
    neutral = dict(top_p=1, frequency_penalty=0, presence_penalty=0, logprobs=None, seed=3)
    whole = c.completions.create(model="tiny-llada", prompt="hi", max_tokens=16, extra_body={"steps": 16}, **neutral)
    text = whole.choices[0].text
    stop = text[len(text) // 2 :][:3]
    assert stop.strip(), text
    cut = c.completions.create(
        model="tiny-llada", prompt="hi", max_tokens=16, stop=[stop], extra_body={"steps": 16}, **neutral
    )
    assert cut.choices[0].text == text[: text.find(stop)] and cut.choices[0].finish_reason == "stop"

    messages = [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Say"}, {"type": "text", "text": "hello"}]},
    ]
    chat = c.chat.completions.create(
        model="tiny-llada", messages=messages, max_completion_tokens=8, extra_body={"steps": 8}, **neutral
    )
    assert chat.usage.completion_tokens == 8

    for field, value in [("frequency_penalty", 0.5), ("logprobs", 2), ("best_of", 3)]:
        with pytest.raises(openai.BadRequestError) as refused:
            c.completions.create(model="tiny-llada", prompt="hi", max_tokens=8, **{field: value})
        assert refused.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as refused:
        c.completions.create(model="tiny-llada", prompt="hi", max_tokens=8, extra_body={"steps": 3, "block_length": 4})
    assert refused.value.body["param"] == "steps"
    response = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "stream_options": {}}, timeout=30)
    assert response.status_code == 422 and "stream" in response.json()["error"]["message"]


def raw_exchange(url: str, head: bytes, body: bytes, wait: float) -> bytes:
    """Send a request head and (part of) a body on a raw socket; what comes back within `wait` s."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as sock:
        sock.sendall(head + body)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ConnectionResetError):
            pass
        return b"".join(chunks)


def test_bodies_get_a_deadline_and_oversized_ones_a_readable_413(tiny_checkpoints):
    """A client that sends part of a body then stops gets 408 at the body deadline; one over the
    body limit gets its 413 after the server drops the body (no connection reset); a trailing
    slash is a 404, never a redirect built from the Host header."""
    with serving(LLM(tiny_checkpoints["llada"]), max_body_bytes=4096, body_seconds=1.0) as (url, _):
        head = b"POST /v1/completions HTTP/1.1\r\nHost: evil.example\r\nContent-Type: application/json\r\n"
        started = time.time()
        partial = raw_exchange(url, head + b"Content-Length: 100\r\n\r\n", b'{"prompt": "h', wait=5)
        assert partial.startswith(b"HTTP/1.1 408") and b"body_timeout" in partial
        assert time.time() - started < 4
        big = json.dumps({"prompt": "x" * 20000}).encode()
        answer = raw_exchange(url, head + f"Content-Length: {len(big)}\r\n\r\n".encode(), big, wait=5)
        assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
        slash = httpx.post(f"{url}/v1/completions/", json={"prompt": "hi"}, headers={"Host": "evil.example"})
        assert slash.status_code == 404 and "location" not in slash.headers
