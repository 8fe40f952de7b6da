"""Running the app under uvicorn so that a stop is prompt and no client can hold the server.

- SIGTERM / Ctrl-C: new requests are refused and queued or running generations are cancelled at
  their next step at once (clients get 503), then uvicorn closes connections after a short grace.
- A connection that has not sent a whole request head within `header_timeout` seconds of
  connecting is closed (half-open or slow clients cannot pile up file descriptors); idle keep-alive
  connections close after `keep_alive` seconds; at most `max_connections` are served at once.
- The same log message is written at most once per `LOG_REPEAT_SECONDS`: a flood of identical
  errors cannot fill the disk.
"""

from __future__ import annotations

import logging
import resource
import time

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

LOG_REPEAT_SECONDS = 10.0


class RepeatFilter(logging.Filter):
    """Drops a log record whose message was already written in the last `seconds`."""

    def __init__(self, seconds: float = LOG_REPEAT_SECONDS):
        super().__init__()
        self.seconds, self.last = seconds, {}

    def filter(self, record: logging.LogRecord) -> bool:
        key, now = (record.name, record.getMessage()), time.monotonic()
        if now - self.last.get(key, -self.seconds) < self.seconds:
            return False
        if len(self.last) > 1000:
            self.last.clear()
        self.last[key] = now
        return True


def guarded_protocol(header_timeout: float) -> type[H11Protocol]:
    class GuardedH11Protocol(H11Protocol):
        """Closes a connection that sends no complete request head in time."""

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._head_deadline = self.loop.call_later(header_timeout, self._head_timeout)

        def _head_timeout(self) -> None:
            if self.cycle is None and not self.transport.is_closing():
                self.transport.close()

        def connection_lost(self, exc: Exception | None) -> None:
            self._head_deadline.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


class StoppingServer(uvicorn.Server):
    """Cancels the engine's work as soon as a stop signal arrives, not after connections drain."""

    def __init__(self, config: uvicorn.Config, app: FastAPI):
        super().__init__(config)
        self.app = app

    def handle_exit(self, sig: int, frame) -> None:
        self.app.state.worker.begin_shutdown()
        super().handle_exit(sig, frame)


def raise_open_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def serve(
    app: FastAPI,
    host: str,
    port: int,
    *,
    log_level: str = "info",
    header_timeout: float = 10.0,
    keep_alive: float = 5.0,
    max_connections: int = 512,
) -> None:
    raise_open_file_limit()
    repeat = RepeatFilter()
    for name in ("asyncio", "uvicorn", "uvicorn.error", "uvicorn.access", "mosaic_dllm"):
        logging.getLogger(name).addFilter(repeat)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        http=guarded_protocol(header_timeout),
        timeout_keep_alive=int(keep_alive),
        limit_concurrency=max_connections,
        timeout_graceful_shutdown=3,
    )
    StoppingServer(config, app).run()
