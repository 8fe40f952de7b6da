"""A real uvicorn server on 127.0.0.1 (an ephemeral port) in a background thread, per test module."""

import json
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import torch
import uvicorn

from mosaic_dllm import LLM
from mosaic_dllm.server import create_app
from tests.tiny import build_tiny_checkpoint


@contextmanager
def serving(llm: LLM, **options):
    app = create_app(llm, **options)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not (server.started and server.servers):
        if time.time() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(timeout=20)


@pytest.fixture(scope="session")
def long_context_checkpoint(tmp_path_factory):
    """A tiny LLaDA whose config allows 4096 positions, for requests long enough to interrupt."""
    path = tmp_path_factory.mktemp("llada_long")
    build_tiny_checkpoint(path, "llada", dtype=torch.bfloat16)
    config = json.loads((path / "config.json").read_text())
    config["max_sequence_length"] = 4096
    (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def server(tiny_checkpoints):
    llm = LLM(tiny_checkpoints["llada"], memory_budget="64MiB")
    with serving(llm, max_queue=32, model_name="tiny-llada") as (url, app):
        yield url, app


def get_json(url: str) -> dict:
    return httpx.get(url, timeout=30).json()
