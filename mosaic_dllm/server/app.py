"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics;
and for people, `/` (a live page that watches the canvas denoise) and `/stats` (its gauges as JSON).

A request is validated (pydantic: unknown fields and bad types are 422), turned into token ids and
a GenerationConfig (bad settings are 400), admitted by its memory plan (400 if it can never fit
the budget, 429 with Retry-After if the queue is full), then run by the single engine worker.
With `stream: true` the answer comes as server-sent events in OpenAI's chunk format; with
`stream_options: {"denoising": true}` each denoising step also sends a chunk with no choices and a
`denoising` object holding the current canvas, masked positions shown as `MASK_MARKER`.

`Service` holds the routes as small named handlers; `create_app` wires them into FastAPI.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import SETTINGS
from ..decoding.common import GenerationCancelled, StepEvent
from ..engine import LLM, USER_ERRORS, ContextTooLong, DoesNotFit, GenerationOutput
from ..memory.rss import current_rss_bytes
from ..runtime.lead import RanksLost
from .metrics import Metrics
from .openai_shapes import Shape, error_body
from .schemas import ChatCompletionRequest, CompletionRequest, Sampling, Unsupported, page_settings
from .worker import GenerationWorker, Job, QueueFull, ServerShuttingDown

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 1
PAGE = Path(__file__).parent / "page.html"
# What the model card says about decoding: the default is the official sampler; the rest are opt-in.
DECODING = {
    "default": "the official sampler of the model's family (tokens equal the official code's)",
    "approximations": {
        "threshold": "Fast-dLLM parallel decoding: every masked token of the block at or above the confidence "
        "threshold a step; an approximation of the official sampler, exact to Fast-dLLM",
        "factor": "Fast-dLLM's factor-based threshold (LLaDA / LLaDA-MoE); an approximation of the official "
        "sampler, exact to Fast-dLLM",
        "cache": "Fast-dLLM block K/V cache, prefix or dual (Dream: its block sampler, which needs one); an "
        "approximation of the official sampler, exact to Fast-dLLM; counted in every memory plan",
    },
}


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, reason: str, param: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.reason, self.extra = status, message, code, reason, extra
        self.param = param


class Service:
    """The server's state and its route handlers."""

    def __init__(self, llm: LLM, model_name: str | None, max_queue: int):
        self.llm, self.max_queue = llm, max_queue
        self.model_id = model_name or llm.checkpoint.name
        self.metrics = Metrics()
        if llm.info.memory_budget:
            self.metrics.budget_bytes.set(llm.info.memory_budget)
        self.worker = GenerationWorker(llm, max_queue, self.metrics)

    # -- errors --------------------------------------------------------------------------------
    async def invalid_body(self, request: Request, exc: RequestValidationError) -> JSONResponse:
        places = [".".join(str(p) for p in e["loc"][1:]) for e in exc.errors()]
        problems = "; ".join(f"{place or 'body'}: {e['msg']}" for place, e in zip(places, exc.errors(), strict=True))
        self.metrics.rejections.labels("invalid_request").inc()
        self.metrics.requests.labels(request.url.path, "422").inc()
        body = error_body(f"invalid request: {problems}", "invalid_request", param=places[0] if places else None)
        return JSONResponse(body, status_code=422)

    async def api_error(self, request: Request, exc: APIError) -> JSONResponse:
        self.metrics.rejections.labels(exc.reason).inc()
        self.metrics.requests.labels(request.url.path, str(exc.status)).inc()
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 429 else None
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        body = error_body(exc.message, exc.code, kind, exc.param, **exc.extra)
        return JSONResponse(body, status_code=exc.status, headers=headers)

    async def http_error(self, request: Request, exc: StarletteHTTPException) -> JSONResponse:
        """Unknown routes and methods, in OpenAI's error shape."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        body = error_body(f"{request.method} {request.url.path}: {exc.detail}", code)
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def unexpected_error(self, request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        body = error_body(f"internal error: {exc}", "internal_error", "server_error")
        return JSONResponse(body, status_code=500)

    # -- informational routes ------------------------------------------------------------------
    async def health(self) -> JSONResponse:
        """200 with what serves; 503 once another rank of a server across ranks is lost (it stops)."""
        budget = self.llm.info.memory_budget
        lost = self.llm.ranks_lost
        body = {
            "status": f"ranks lost: {lost}" if lost else "ok",
            "ranks": self.llm.ranks,
            "model": self.model_id,
            "family": self.llm.info.family,
            "executor": self.llm.info.executor,
            "weights": self.llm.info.weights,
            "admission": "by memory plan" if budget else "unplanned (eager executor: no budget)",
            "memory_budget_bytes": budget,
            "arena_committed_bytes": self.llm.committed_bytes,
            "running": self.worker.running,
            "max_batch": self.llm.info.max_batch,
            "waiting": self.worker.waiting,
            "max_queue": self.max_queue,
        }
        return JSONResponse(body, status_code=503 if lost else 200)

    async def stats(self) -> dict:
        """The gauges the page shows, as JSON: the batch, the queue, memory planned and committed."""
        batch = self.worker.scheduler.stats
        return {
            "running": batch.running,
            "waiting": self.worker.waiting,
            "max_batch": self.worker.scheduler.max_batch,
            "max_queue": self.max_queue,
            "batch_sequences": batch.sequences,
            "batch_tokens": batch.tokens,
            "planned_bytes": batch.planned_bytes,
            "memory_budget_bytes": self.llm.info.memory_budget,
            "arena_committed_bytes": self.llm.committed_bytes,
            "rss_bytes": current_rss_bytes(),
            "ranks": self.llm.rank_memory,  # across ranks: each rank's RSS and arena after the last step
        }

    async def page(self) -> HTMLResponse:
        """The live page: one self-contained file, no request to any other host; its settings
        fields are those this model's sampler reads."""
        fields = json.dumps(page_settings(self.llm.info.sampler)).replace("</", "<\\/")
        return HTMLResponse(PAGE.read_text(encoding="utf-8").replace("/*SETTINGS*/[]", fields))

    async def prometheus(self) -> Response:
        return Response(self.metrics.render(), media_type="text/plain; version=0.0.4")

    async def models(self) -> dict:
        card = {"id": self.model_id, "object": "model", "created": 0, "owned_by": "mosaic-dllm", "decoding": DECODING}
        card["chat"] = self.llm.info.chat  # without a chat template, /v1/chat/completions refuses
        card["weights"] = self.llm.info.weights  # "int8" / "int4-g32": quantized, an approximation
        return {"object": "list", "data": [card]}

    # -- generation routes ---------------------------------------------------------------------
    async def completions(self, body: CompletionRequest, request: Request):
        settings, stops = self.openai_fields(body)
        if isinstance(body.prompt, str):
            self.check_text_length(len(body.prompt))
        job = await self.admit(body, settings, await self.encode(self.llm.encode, body.prompt))
        return await self.respond(request, body, job, chat=False, stops=stops)

    async def chat_completions(self, body: ChatCompletionRequest, request: Request):
        settings, stops = self.openai_fields(body)
        messages = [m.for_template() for m in body.messages]
        self.check_text_length(sum(len(m["content"]) for m in messages))
        job = await self.admit(body, settings, await self.encode(self.llm.encode_chat, messages))
        return await self.respond(request, body, job, chat=True, stops=stops)

    @staticmethod
    def openai_fields(body: Sampling) -> tuple[dict, list[str]]:
        """The request's generation settings and stop strings, or APIError naming an OpenAI field
        set to a value this server cannot honour."""
        try:
            problem = body.unsupported()
            if problem is not None:
                raise problem
            return body.generation_settings(), body.stops()
        except Unsupported as exc:
            raise APIError(400, str(exc), "unsupported_parameter", "unsupported", exc.param) from None

    def check_text_length(self, chars: int) -> None:
        """Refuse, before tokenizing, a text too long to fit the context in any tokenization."""
        tokenizer, context = self.llm.tokenizer, self.llm.info.context
        if tokenizer is not None and chars > context * tokenizer.longest_token_chars:
            raise APIError(
                400,
                f"the prompt ({chars} characters) is longer than the model's context of {context} tokens can hold",
                "context_length_exceeded",
                "context_length",
            )

    async def encode(self, fn: Callable, *args) -> list[int]:
        """Tokenize in a worker thread: a long text never stalls the event loop."""
        try:
            return await run_in_threadpool(fn, *args)
        except USER_ERRORS as exc:
            raise APIError(400, str(exc), "invalid_prompt", "invalid_prompt") from None

    async def admit(self, body: Sampling, settings: dict, prompt_ids: list[int]) -> Job:
        """Settings checked, context checked, memory planned and a queue slot taken, or APIError."""
        if body.model not in (None, self.model_id):
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {self.model_id!r}",
                "model_not_found",
                "unknown_model",
                "model",
            )
        llm = self.llm
        try:  # one request, resolved and context-checked once; the worker plans it
            request = llm.request(prompt_ids, llm.default_config(**settings), planned=False)
        except ContextTooLong as exc:
            raise APIError(400, str(exc), "context_length_exceeded", "context_length") from None
        except USER_ERRORS as exc:
            raise APIError(400, str(exc), "invalid_settings", "invalid_settings", setting_param(exc)) from None
        try:
            return await self.worker.admit(request)
        except DoesNotFit as exc:
            raise APIError(
                400, str(exc), "memory_budget_exceeded", "memory_budget", longest_length=exc.max_length
            ) from None
        except QueueFull as exc:
            raise APIError(429, f"server busy: {exc}; retry later", "queue_full", "queue_full") from None
        except ServerShuttingDown as exc:
            raise self.shutting_down(str(exc)) from None

    async def respond(self, request: Request, body: Sampling, job: Job, chat: bool, stops: list[str]):
        shape = Shape(f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", self.model_id, chat, stops)
        if body.stream:
            options = body.stream_options
            denoising, usage = (options.denoising, options.include_usage) if options else (False, False)
            events = self.watch_steps(job)
            task = asyncio.ensure_future(self.run(request.url.path, job))  # owns the queue slot from now on
            stream = self.stream(task, job, shape, events, usage, denoising)
            return StreamingResponse(stream, media_type="text/event-stream")
        task = asyncio.ensure_future(self.run(request.url.path, job))
        while not task.done():  # a client that goes away cancels its generation
            await asyncio.wait({task}, timeout=0.2)
            if not task.done() and await request.is_disconnected():
                job.cancelled.set()
        try:
            out = await task
        except GenerationCancelled:
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(shape.response(out))

    async def run(self, path: str, job: Job) -> GenerationOutput:
        start = time.perf_counter()
        try:
            out = await self.worker.run(job)
        except GenerationCancelled:
            if self.worker.shutting_down:
                raise self.shutting_down("the server is shutting down") from None
            self.metrics.requests.labels(path, "499").inc()
            self.metrics.rejections.labels("client_disconnected").inc()
            raise
        except RanksLost as exc:  # the launcher stops the server; say why meanwhile
            raise self.shutting_down(str(exc)) from None
        except Exception as exc:  # the request fails, the server keeps serving
            log.exception("generation failed")
            raise APIError(500, f"internal error while generating: {exc}", "internal_error", "internal_error") from exc
        self.metrics.requests.labels(path, "200").inc()
        self.metrics.prompt_tokens.inc(job.request.prompt.numel())
        self.metrics.generated_tokens.inc(len(out.token_ids))
        self.metrics.forward_passes.inc(out.forward_passes)
        self.metrics.request_latency.observe(time.perf_counter() - start)
        return out

    def shutting_down(self, message: str) -> APIError:
        """503 for a server that stops: because another of its ranks is gone (say so), or as asked."""
        if lost := self.llm.ranks_lost:
            return APIError(503, f"{lost}: this server stops", "ranks_lost", "ranks_lost")
        return APIError(503, message, "server_shutting_down", "shutting_down")

    @staticmethod
    def watch_steps(job: Job) -> asyncio.Queue[StepEvent]:
        """Denoising events of `job`, copied in the worker thread before the next step changes them."""
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def on_step(event: StepEvent) -> None:
            loop.call_soon_threadsafe(events.put_nowait, replace(event, canvas=event.canvas.clone()))

        job.on_step = on_step
        return events

    async def stream(
        self, task: asyncio.Future, job: Job, shape: Shape, events: asyncio.Queue, usage: bool, denoising: bool
    ) -> AsyncIterator[str]:
        """Per step, the text that settled (and with `denoising`, the step's event); then the rest."""
        eos_ids = self.llm.info.eos_token_ids
        try:
            # every step's event, unless the job was cancelled: then only its end matters
            while not task.done() or (not events.empty() and not job.cancelled.is_set()):
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    continue
                event = getter.result()
                if denoising:
                    chunk = shape.denoising_chunk(event, self.llm.decode, eos_ids)
                    if chunk["denoising"]["step"] == 1:  # the first step: how the request got in
                        chunk["denoising"]["admission"] = job.admission(self.llm.info.memory_budget)
                    yield sse(chunk)
                if (settled := shape.settled_chunk(event, self.llm.decode, eos_ids)) is not None:
                    yield sse(settled)
            try:
                out = await task
            except APIError as exc:
                yield sse(error_body(exc.message, exc.code, "server_error"))
                return
            except GenerationCancelled:
                return
            yield sse(shape.final_chunk(out))
            if usage:
                yield sse(shape.usage_chunk(out))
            yield "data: [DONE]\n\n"
        finally:  # client gone (the response is cancelled) or done: stop the generation
            job.cancelled.set()
            if not task.done():
                task.add_done_callback(lambda t: t.cancelled() or t.exception())


def setting_param(exc: Exception) -> str | None:
    """The request field a settings error names (its first word, when that is a setting)."""
    first = str(exc).split(" ", 1)[0].strip("[]'\",")
    return SETTINGS[first].field_name if first in SETTINGS else None


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class BodyTimeout(Exception):
    """The request body did not arrive in time."""


class BodyLimit:
    """ASGI middleware for request bodies: one over `max_bytes` gets 413 (by its Content-Length, or
    as it streams in), one not whole within `seconds` of the request head gets 408. A refused body
    is read and dropped (up to DRAIN_BYTES, within the deadline) before the answer, so the client
    reads the answer instead of a connection reset."""

    DRAIN_BYTES = 64 << 20

    def __init__(self, app, max_bytes: int, seconds: float):
        self.app, self.max_bytes, self.seconds = app, max_bytes, seconds

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        body_done = scope.get("method") in ("GET", "HEAD", "OPTIONS")

        async def timed_receive():
            """The next message; the deadline applies until the body is whole, not after (later
            reads are the app's disconnect checks)."""
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0.001))
            except TimeoutError:
                raise BodyTimeout from None
            body_done = message["type"] != "http.request" or not message.get("more_body", False)
            return message

        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await self.drain(timed_receive)
            return await self.refuse(send, 413, f"request body larger than {self.max_bytes} bytes", "request_too_large")
        received, refused = 0, False

        async def limited_receive():
            nonlocal received, refused
            try:
                message = await timed_receive()
            except BodyTimeout:
                refused = True
                await self.refuse(send, 408, f"request body not received within {self.seconds:g} s", "body_timeout")
                return {"type": "http.disconnect"}
            received += len(message.get("body", b""))
            if received > self.max_bytes and not refused:  # answer now; the app sees a disconnect
                refused = True
                await self.drain(timed_receive)
                await self.refuse(send, 413, f"request body larger than {self.max_bytes} bytes", "request_too_large")
                return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except Exception:
            if not refused:
                raise

    async def drain(self, timed_receive) -> None:
        """Read the rest of a refused body, dropping it (bounded in bytes and by the deadline)."""
        drained = 0
        try:
            while drained < self.DRAIN_BYTES:
                message = await timed_receive()
                drained += len(message.get("body", b""))
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
        except BodyTimeout:
            return

    @staticmethod
    async def refuse(send, status: int, message: str, code: str) -> None:
        body = json.dumps(error_body(message, code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        headers.append((b"connection", b"close"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def create_app(
    llm: LLM,
    model_name: str | None = None,
    max_queue: int = 16,
    max_body_bytes: int = 2 << 20,
    body_seconds: float = 30.0,
) -> FastAPI:
    service = Service(llm, model_name, max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.worker.shutdown()  # queued and running requests are cancelled at their next step

    app = FastAPI(title="mosaic-dllm", lifespan=lifespan, redirect_slashes=False)  # no Location from a Host header
    app.state.service, app.state.worker, app.state.metrics, app.state.llm = (
        service,
        service.worker,
        service.metrics,
        llm,
    )
    app.add_exception_handler(RequestValidationError, service.invalid_body)
    app.add_exception_handler(APIError, service.api_error)
    app.add_exception_handler(StarletteHTTPException, service.http_error)
    app.add_exception_handler(Exception, service.unexpected_error)
    app.add_api_route("/", service.page, methods=["GET"], include_in_schema=False)
    app.add_api_route("/stats", service.stats, methods=["GET"])
    app.add_api_route("/health", service.health, methods=["GET"])
    app.add_api_route("/metrics", service.prometheus, methods=["GET"])
    app.add_api_route("/v1/models", service.models, methods=["GET"])
    app.add_api_route("/v1/completions", service.completions, methods=["POST"])
    app.add_api_route("/v1/chat/completions", service.chat_completions, methods=["POST"])
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes, seconds=body_seconds)
    return app
