"""`mosaic serve` as a real process for tests that need one (signals, sockets, the browser)."""

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mosaic_serve(checkpoint, *flags: str, log=None, start_seconds: float = 120):
    """(url, process) of `mosaic serve` on a free port (`checkpoint` None: the default model), once
    /health answers; stopped (SIGTERM, then SIGKILL) when the block ends."""
    port = free_port()
    model = ["--model", str(checkpoint)] if checkpoint is not None else []
    args = [sys.executable, "-m", "mosaic_dllm.cli", "serve", *model, "--port", str(port), *flags]
    out = log or subprocess.DEVNULL
    proc = subprocess.Popen(args, stdout=out, stderr=out, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + start_seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("mosaic serve did not start")
        time.sleep(0.1)
    try:
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
