"""The OpenAI-compatible HTTP server: /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

A request is validated (pydantic: unknown fields and bad types are 422), turned into token ids and
a GenerationConfig (bad settings are 400), admitted by its memory plan (400 if it can never fit
the budget, 429 with Retry-After if the queue is full), then run by the single engine worker.
With `stream: true` the answer comes as server-sent events in OpenAI's chunk format; with
`stream_options: {"denoising": true}` each denoising step also sends a chunk with no choices and a
`denoising` object holding the current canvas, masked positions shown as `mask_marker`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..config import GenerationConfigError
from ..decoding.common import GenerationCancelled, StepEvent
from ..engine import LLM, GenerationOutput, PromptError
from ..planner.search import DoesNotFit
from ..tokenizer import TokenizerError
from .metrics import Metrics
from .schemas import ChatCompletionRequest, CompletionRequest, Sampling
from .worker import GenerationWorker, Job, QueueFull

log = logging.getLogger(__name__)
USER_ERRORS = (GenerationConfigError, PromptError, TokenizerError, ValueError)
MASK_MARKER = "\u2591"  # light shade: one per masked position in denoising events
RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    def __init__(self, status: int, message: str, code: str, reason: str, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.reason, self.extra = status, message, code, reason, extra


def error_body(message: str, code: str, kind: str = "invalid_request_error", **extra) -> dict:
    return {"error": {"message": message, "type": kind, "param": None, "code": code} | extra}


def create_app(llm: LLM, model_name: str | None = None, max_queue: int = 16) -> FastAPI:
    model_id = model_name or Path(llm.checkpoint.path).name
    metrics = Metrics()
    budget = getattr(llm.executor, "memory_budget", None)
    if budget:
        metrics.budget_bytes.set(budget)
    worker = GenerationWorker(llm, max_queue, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.shutdown()  # graceful: queued and running requests are cancelled at their next step

    app = FastAPI(title="mosaic-dllm", lifespan=lifespan)
    app.state.worker, app.state.metrics, app.state.llm = worker, metrics, llm

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        metrics.rejections.labels("invalid_request").inc()
        metrics.requests.labels(request.url.path, "422").inc()
        return JSONResponse(error_body(f"invalid request: {problems}", "invalid_request"), status_code=422)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        metrics.rejections.labels(exc.reason).inc()
        metrics.requests.labels(request.url.path, str(exc.status)).inc()
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if exc.status == 429 else None
        kind = "server_error" if exc.status >= 500 else "invalid_request_error"
        body = error_body(exc.message, exc.code, kind, **exc.extra)
        return JSONResponse(body, status_code=exc.status, headers=headers)

    @app.get("/health")
    async def health() -> dict:
        arena = getattr(llm.executor, "arena", None)
        return {
            "status": "ok",
            "model": model_id,
            "family": llm.spec.family,
            "executor": llm.executor.name,
            "admission": "by memory plan" if budget else "unplanned (eager executor: no budget)",
            "memory_budget_bytes": budget,
            "arena_committed_bytes": arena.touched_bytes if arena is not None else 0,
            "running": worker.running is not None,
            "waiting": worker.waiting,
            "max_queue": max_queue,
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict:
        return {
            "object": "list",
            "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "mosaic-dllm"}],
        }

    def prepare(body: Sampling, prompt_ids: list[int]) -> Job:
        if body.model not in (None, model_id):
            raise APIError(
                404,
                f"model {body.model!r} is not served here; this server serves {model_id!r}",
                "model_not_found",
                "unknown_model",
            )
        try:
            config = llm.default_config(**body.generation_settings()).resolved(llm.spec.family)
        except USER_ERRORS as exc:
            raise APIError(400, str(exc), "invalid_settings", "invalid_settings") from None
        total = len(prompt_ids) + config.gen_length
        if total > llm.spec.max_position_embeddings:
            raise APIError(
                400,
                f"prompt ({len(prompt_ids)} tokens) plus max_tokens ({config.gen_length}) is {total} tokens, more "
                f"than the model's context of {llm.spec.max_position_embeddings}",
                "context_length_exceeded",
                "context_length",
            )
        try:
            planned = worker.admit(prompt_ids, config)
        except DoesNotFit as exc:
            raise APIError(
                400, str(exc), "memory_budget_exceeded", "memory_budget", longest_length=exc.max_length
            ) from None
        except QueueFull as exc:
            raise APIError(429, f"server busy: {exc}; retry later", "queue_full", "queue_full") from None
        return Job(prompt_ids, config, planned_bytes=planned)

    def encode(fn, *args) -> list[int]:
        try:
            return fn(*args)
        except USER_ERRORS as exc:
            raise APIError(400, str(exc), "invalid_prompt", "invalid_prompt") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        job = prepare(body, encode(llm.encode, body.prompt))
        return await respond(request, body, job, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        job = prepare(body, encode(llm.encode_chat, messages))
        return await respond(request, body, job, chat=True)

    async def respond(request: Request, body: Sampling, job: Job, chat: bool):
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        shape = Shape(rid, model_id, chat)
        if body.stream:
            options = body.stream_options
            return StreamingResponse(
                stream(
                    request,
                    job,
                    shape,
                    options.denoising if options else False,
                    options.include_usage if options else False,
                ),
                media_type="text/event-stream",
            )
        task = asyncio.ensure_future(run(request.url.path, job))
        while not task.done():  # a client that goes away cancels its generation
            await asyncio.wait({task}, timeout=0.2)
            if not task.done() and await request.is_disconnected():
                job.cancelled.set()
        try:
            out = await task
        except GenerationCancelled:
            return Response(status_code=499)  # nobody is listening any more
        return shape.response(out, job)

    async def run(path: str, job: Job) -> GenerationOutput:
        start = time.perf_counter()
        try:
            out = await worker.run(job)
        except GenerationCancelled:
            metrics.requests.labels(path, "499").inc()
            metrics.rejections.labels("client_disconnected").inc()
            raise
        except Exception as exc:  # the request fails, the server keeps serving
            log.exception("generation failed")
            raise APIError(500, f"internal error while generating: {exc}", "internal_error", "internal_error") from exc
        metrics.requests.labels(path, "200").inc()
        metrics.prompt_tokens.inc(len(job.prompt_ids))
        metrics.generated_tokens.inc(len(out.token_ids))
        metrics.request_latency.observe(time.perf_counter() - start)
        return out

    async def stream(request: Request, job: Job, shape: Shape, denoising: bool, usage: bool) -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[StepEvent] = asyncio.Queue()
        if denoising:

            def on_step(event: StepEvent) -> None:  # worker thread: copy the canvas before the next step
                loop.call_soon_threadsafe(events.put_nowait, replace(event, canvas=event.canvas.clone()))

            job.on_step = on_step
        task = asyncio.ensure_future(run(request.url.path, job))
        try:
            while not task.done() or not events.empty():
                getter = asyncio.ensure_future(events.get())
                await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter.done():
                    yield sse(shape.denoising_chunk(getter.result(), llm))
                else:
                    getter.cancel()
            try:
                out = await task
            except APIError as exc:
                yield sse(error_body(exc.message, exc.code, "server_error"))
                return
            yield sse(shape.final_chunk(out))
            if usage:
                yield sse(shape.usage_chunk(out, job))
            yield "data: [DONE]\n\n"
        finally:  # client gone (the response is cancelled) or done: stop the generation
            job.cancelled.set()
            if not task.done():
                task.add_done_callback(lambda t: t.cancelled() or t.exception())

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


class Shape:
    """OpenAI response and chunk objects for one request."""

    def __init__(self, rid: str, model: str, chat: bool):
        self.rid, self.model, self.chat, self.created = rid, model, chat, int(time.time())

    def _base(self, chunk: bool) -> dict:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.rid, "object": kind, "created": self.created, "model": self.model}

    @staticmethod
    def usage(out: GenerationOutput, job: Job) -> dict:
        n_prompt, n_gen = len(job.prompt_ids), len(out.token_ids)
        return {"prompt_tokens": n_prompt, "completion_tokens": n_gen, "total_tokens": n_prompt + n_gen}

    @staticmethod
    def finish_reason(out: GenerationOutput) -> str:
        return "stop" if out.finish_reason == "eos" else "length"

    def response(self, out: GenerationOutput, job: Job) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": out.text}}
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None}
        choice["finish_reason"] = self.finish_reason(out)
        return self._base(False) | {"choices": [choice], "usage": self.usage(out, job)}

    def final_chunk(self, out: GenerationOutput) -> dict:
        if self.chat:
            choice = {"index": 0, "delta": {"role": "assistant", "content": out.text}}
        else:
            choice = {"index": 0, "text": out.text, "logprobs": None}
        return self._base(True) | {"choices": [choice | {"finish_reason": self.finish_reason(out)}]}

    def usage_chunk(self, out: GenerationOutput, job: Job) -> dict:
        return self._base(True) | {"choices": [], "usage": self.usage(out, job)}

    def denoising_chunk(self, event: StepEvent, llm: LLM) -> dict:
        answer = event.canvas[event.prompt_length :].tolist()
        text, run = [], []
        for token in answer:  # decode runs of revealed tokens, one marker per masked position
            if token == event.mask_token_id:
                text.append(llm.decode(run) if run else "")
                run = []
                text.append(MASK_MARKER)
            else:
                run.append(token)
        text.append(llm.decode(run) if run else "")
        masked = sum(t == event.mask_token_id for t in answer)
        return self._base(True) | {
            "choices": [],
            "denoising": {"step": event.step, "steps": event.total_steps, "masked": masked, "text": "".join(text)},
        }
