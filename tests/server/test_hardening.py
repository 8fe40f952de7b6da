"""Faults a server must survive: bursts past the queue bound, a stop with work in flight, work-sized
settings, huge bodies, half-open connections. Each runs `mosaic serve` as a real process."""

import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.processes import mosaic_serve

LONG = {"prompt": "Return the", "max_tokens": 1024, "steps": 1024}


@pytest.mark.slow
def test_a_burst_gets_exactly_the_queue_bound(long_context_checkpoint):
    flags = ("--max-batch", "4", "--max-queue", "2", "--memory-budget", "256MiB")
    with mosaic_serve(long_context_checkpoint, *flags) as (url, _):
        barrier = threading.Barrier(20)

        def post(_):
            barrier.wait()
            return httpx.post(f"{url}/v1/completions", json=LONG | {"max_tokens": 256, "steps": 64}, timeout=300)

        with ThreadPoolExecutor(20) as pool:
            codes = sorted(r.status_code for r in pool.map(post, range(20)))
        assert codes == [200] * 6 + [429] * 14  # four running and two waiting; every accepted one completes


def test_a_stop_cancels_work_in_flight_and_exits_promptly(long_context_checkpoint):
    with mosaic_serve(long_context_checkpoint, "--memory-budget", "256MiB") as (url, proc):
        results = {}

        def stream():
            body = LONG | {"stream": True, "stream_options": {"denoising": True}}
            with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
                results["stream"] = [line for line in r.iter_lines() if line]

        def queued():
            results["queued"] = httpx.post(f"{url}/v1/completions", json=LONG, timeout=60)

        threads = [threading.Thread(target=stream), threading.Thread(target=queued)]
        for t in threads:
            t.start()
            time.sleep(0.5)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        elapsed = time.time() - start
        for t in threads:
            t.join(timeout=20)
        assert elapsed < 10
        assert results["queued"].status_code == 503 and results["queued"].json()["error"]["code"] == (
            "server_shutting_down"
        )
        assert any("shutting down" in line for line in results["stream"])


@pytest.mark.parametrize("steps", [10**9, 10**12, 10**30])
def test_settings_that_size_work_are_bounded(server, steps):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 16, "steps": steps}, timeout=30)
    assert r.status_code in (400, 422) and "steps" in r.json()["error"]["message"]


def test_a_huge_body_is_refused_while_health_keeps_answering(tiny_checkpoints):
    body = json.dumps({"prompt": "word " * 2_000_000, "max_tokens": 8}).encode()  # 10 MB
    with mosaic_serve(tiny_checkpoints["llada"]) as (url, _), httpx.Client(timeout=5) as health:
        health.get(f"{url}/health")  # a warm connection, as a monitor keeps one
        worst = []

        def poll():
            for _ in range(20):
                start = time.time()
                assert health.get(f"{url}/health").status_code == 200
                worst.append(time.time() - start)
                time.sleep(0.02)

        poller = threading.Thread(target=poll)
        poller.start()
        headers = {"content-type": "application/json"}
        big = httpx.post(f"{url}/v1/completions", content=body, headers=headers, timeout=60)
        chunked = httpx.post(
            f"{url}/v1/completions",
            content=iter([body[i : i + 65536] for i in range(0, len(body), 65536)]),
            headers=headers,
            timeout=60,
        )
        poller.join()
    for response in (big, chunked):  # by Content-Length, and as a chunked body streams in
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
    assert max(worst) < 0.1


def test_a_long_text_is_refused_before_tokenizing(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "x" * 1_000_000, "max_tokens": 8}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


@pytest.mark.slow
def test_half_open_connections_do_not_stop_service(tiny_checkpoints, tmp_path):
    log_path = tmp_path / "serve.log"
    with (
        open(log_path, "wb") as log,
        mosaic_serve(tiny_checkpoints["llada"], "--header-timeout", "1", log=log) as (
            url,
            _,
        ),
    ):
        port = int(url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(300)]
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 8, "steps": 4}, timeout=30)
        assert r.status_code == 200
        time.sleep(2)
        for s in idle:  # closed by the server after the header timeout
            s.settimeout(2)
            assert s.recv(1) == b""
            s.close()
    assert os.path.getsize(log_path) < 100_000
    log = log_path.read_text()
    assert "mosaic serve: " in log and "Uvicorn running on" in log and '"POST /v1/completions HTTP/1.1" 200' in log
