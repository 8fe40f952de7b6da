"""`mosaic serve --nproc 2 --executor sequence-parallel`: rank 0 serves, rank 1 follows its steps;
answers are one process's, batched requests included (with block caches, and a block-diffusion
model's), and the ranks stop with the server."""

import os
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from mosaic_dllm import LLM
from tests.processes import mosaic_serve


def test_a_server_across_two_ranks_answers_as_one_process(tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tiny_checkpoints["dream"]
    bodies = [
        {"prompt": prompt, "max_tokens": 12, "steps": 6, "seed": seed, "temperature": 0.5}
        for prompt, seed in (("Return the", 3), ("Open the file", 4), ("def main", 5))
    ]
    flags = ("--executor", "sequence-parallel", "--nproc", "2", "--max-batch", "4", "--memory-budget", "64MiB")
    with mosaic_serve(path, *flags) as (url, proc):
        with ThreadPoolExecutor(3) as pool:  # together: the scheduler batches them
            answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=120), bodies))
        cached_bodies = [bodies[0] | {"cache": c, "block_length": 4, "threshold": 0.3} for c in ("dual", "prefix")]
        with ThreadPoolExecutor(2) as pool:  # each rank keeps each request's cache (its heads)
            cached = list(pool.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=120), cached_bodies))
        health = httpx.get(f"{url}/health", timeout=10).json()
        stats = httpx.get(f"{url}/stats", timeout=10).json()
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0  # rank 1 returned when rank 0 stopped
    assert [a.status_code for a in answers] == [200] * 3, [a.text for a in answers]
    assert [a.status_code for a in cached] == [200] * 2, [a.text for a in cached]
    assert health["executor"] == "sequence-parallel" and health["ranks"] == 2 and health["status"] == "ok"
    assert len(stats["ranks"]) == 2
    assert all(r["rss_bytes"] > 0 and r["arena_committed_bytes"] > 0 for r in stats["ranks"])
    assert 'mosaic_rank_rss_bytes{rank="1"}' in metrics and 'mosaic_rank_arena_committed_bytes{rank="0"}' in metrics
    llm = LLM(path)
    for body, answer in zip(bodies, answers, strict=True):
        cfg = llm.default_config(gen_length=12, steps=6, seed=body["seed"], temperature=0.5)
        assert answer.json()["choices"][0]["text"] == llm.generate(body["prompt"], cfg)[0].text
    for body, answer in zip(cached_bodies, cached, strict=True):
        cfg = llm.default_config(gen_length=12, steps=6, seed=3, temperature=0.5, block_length=4, threshold=0.3)
        cfg = llm.default_config(**(cfg.given() | {"cache": body["cache"]}))
        assert answer.json()["choices"][0]["text"] == llm.generate(body["prompt"], cfg)[0].text
    assert not [pid for pid in os.listdir("/proc") if pid.isdigit() and _is_rank_of(int(pid), proc.pid)]


@pytest.mark.parametrize("family", ["sdar", "llada2"])
def test_a_block_diffusion_model_served_across_ranks_answers_as_one_process(tiny_checkpoints, monkeypatch, family):
    """Over two sequence-parallel ranks, requests batched at different stages: SDAR, each rank
    keeping each request's K/V cache (its heads); LLaDA2.x, whose steps keep nothing. The answers
    are one process's."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    path = tiny_checkpoints[family]
    extra = {"block_length": 4, "steps": 2} if family == "llada2" else {}
    bodies = [
        {"prompt": p, "max_tokens": 12, "seed": s} | extra for p, s in (("Return the", 1), ("Open the file " * 4, 2))
    ]
    with mosaic_serve(path, "--executor", "sequence-parallel", "--nproc", "2", "--max-batch", "4") as (url, proc):
        with ThreadPoolExecutor(2) as pool:
            answers = list(pool.map(lambda b: httpx.post(f"{url}/v1/completions", json=b, timeout=120), bodies))
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    assert [a.status_code for a in answers] == [200] * 2, [a.text for a in answers]
    llm = LLM(path)
    for body, answer in zip(bodies, answers, strict=True):
        cfg = llm.default_config(gen_length=12, seed=body["seed"], **extra)
        assert answer.json()["choices"][0]["text"] == llm.generate(body["prompt"], cfg)[0].text


def _is_rank_of(pid: int, launcher: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1]) == launcher
    except (OSError, IndexError, ValueError):
        return False


def test_a_rank_that_dies_while_serving_fails_its_requests_with_503_and_stops_the_server(tiny_checkpoints, tmp_path):
    """Rank 1 is killed during a long generation: the request gets one clear 503 within seconds,
    the launcher stops rank 0 and exits naming the dead rank; nothing hangs."""
    import threading
    import time

    from tests.distributed.test_faults import children, rank_of

    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115 (the server writes it until it exits)
    flags = ("--executor", "sequence-parallel", "--nproc", "2")
    with mosaic_serve(tiny_checkpoints["dream"], *flags, log=log) as (url, proc):
        body = {"prompt": "Return the", "max_tokens": 240, "steps": 240}
        answer = {}
        request = threading.Thread(
            target=lambda: answer.update(r=httpx.post(f"{url}/v1/completions", json=body, timeout=120))
        )
        request.start()
        while httpx.get(f"{url}/stats", timeout=10).json()["running"] == 0:  # until it runs its steps
            assert request.is_alive()
            time.sleep(0.05)
        victim = next(pid for pid in children(proc.pid) if rank_of(pid) == 1)
        os.kill(victim, signal.SIGKILL)
        request.join(timeout=60)
        assert proc.wait(timeout=60) == 2
    log.close()
    response = answer["r"]
    assert response.status_code == 503, response.text
    assert response.json()["error"]["message"].startswith("another rank died or stopped answering (")
    last = (tmp_path / "serve.log").read_text().strip().splitlines()[-1]
    assert last.startswith("error: the run failed across its ranks:")
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in last
