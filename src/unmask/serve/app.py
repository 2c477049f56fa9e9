"""The HTTP API (FastAPI): OpenAI-style completions and chat completions, models, health, and the
page at ``/``. Decoding runs in worker threads (one per running request, at most
``Limits.max_active``), batched by the engine's scheduler, so the event loop stays free: /health
answers while requests are decoded. Bad input is answered with 4xx and an OpenAI-style error body
naming the field; nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from unmask.errors import UnmaskError
from unmask.serve.batcher import Cancelled, Ticket
from unmask.serve.engine import Engine, Job, Params, RequestError
from unmask.serve.schemas import ChatRequest, ChatResponse, CompletionRequest, CompletionResponse, ErrorBody

STATIC = Path(__file__).with_name("static")
ERRORS = {400: {"model": ErrorBody, "description": "Invalid request (the error names the field)"},
          404: {"model": ErrorBody, "description": "Unknown model"},
          429: {"model": ErrorBody, "description": "Queue full"},
          504: {"model": ErrorBody, "description": "Request timed out"}}


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def chat_prompt(messages) -> str:
    """Plain prompt formatting (checkpoints carry no chat template): one ``Role: content`` line per
    message, then ``Assistant:``, which the model continues."""
    return "".join(f"{m.role.capitalize()}: {m.content}\n" for m in messages) + "Assistant:"


def _sse(data: dict, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class Server:
    """The app's state: the engine, the worker threads and the admission counters."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pool = ThreadPoolExecutor(engine.limits.max_active, thread_name_prefix="unmask-request")
        self.slots: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0
        self.served = 0
        self.cancelled = 0

    async def admit(self, ticket: Ticket) -> None:
        """Wait for a decoding slot; refuse when the queue is full or the request's time runs out."""
        lim = self.engine.limits
        if self.slots is None:
            self.slots = asyncio.Semaphore(lim.max_active)
        if self.waiting >= lim.max_queue and self.slots.locked():
            raise RequestError(f"server busy: {self.running} requests decoding and {self.waiting} waiting (limit {lim.max_queue}); retry later",
                               None, 429, "rate_limit_exceeded")
        self.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), timeout=max(0.0, ticket.deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise RequestError(f"timed out after {lim.timeout:g} s waiting for a decoding slot", None, 504, "timeout") from None
        finally:
            self.waiting -= 1
        self.running += 1

    def start(self, job: Job, ticket: Ticket, on_frame=None) -> asyncio.Future:
        fut = asyncio.get_running_loop().run_in_executor(self.pool, self.engine.run, job, ticket, on_frame)

        def release(done: asyncio.Future) -> None:
            self.running -= 1
            self.served += 1
            self.cancelled += isinstance(done.exception(), Cancelled)
            self.slots.release()

        fut.add_done_callback(release)
        return fut


def failure(exc: BaseException) -> RequestError:
    """The error a request's decoding ended with, as the client sees it."""
    if isinstance(exc, Cancelled):
        if str(exc) == "timeout":
            return RequestError("the request ran past the server's per-request timeout", None, 504, "timeout")
        return RequestError(f"request cancelled ({exc})", None, 499, "cancelled")
    if isinstance(exc, (UnmaskError, RequestError)):
        return exc if isinstance(exc, RequestError) else RequestError(str(exc))
    raise exc


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving ``engine``."""
    app = FastAPI(title="unmask", version="0.1.0", description=(
        "OpenAI-compatible completions from a masked diffusion (MDM) or autoregressive checkpoint. "
        "Concurrent requests are decoded together, one network forward per step."))
    server = Server(engine)
    app.state.server = server
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(400, f"malformed JSON body: {first.get('msg')}", None, code="json_invalid")
        param = loc[0] if loc and not loc[0].isdigit() else None
        if first.get("type") == "extra_forbidden":
            return error_response(400, f"unknown field {'.'.join(loc)!r}", param, code="unknown_field")
        where = ".".join(loc) or "body"
        return error_response(400, f"{where}: {first.get('msg')}", param, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return error_response(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(UnmaskError)
    async def unmask_error(request: Request, exc: UnmaskError):
        return error_response(400, str(exc))

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health")
    async def health():
        """Answers while requests are decoded: running and waiting requests, batching counters."""
        stats = dict(engine.scheduler.stats)
        stats["mean_requests_per_forward"] = stats["requests_per_forward"] / stats["forwards"] if stats["forwards"] else 0.0
        return {"status": "ok", "model": engine.name, "objective": engine.config.train.objective, "running": server.running,
                "waiting": server.waiting, "served": server.served, "cancelled": server.cancelled, "batching": stats}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": engine.name, "object": "model", "created": 0, "owned_by": "unmask", "objective": engine.config.train.objective,
            "context_length": engine.context, "limits": vars(engine.limits)}]}

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def completions(body: CompletionRequest, request: Request):
        """Text completion. MDM checkpoints take the diffusion fields; with ``stream`` the answer is
        server-sent events (``stream_canvas`` adds ``event: canvas`` frames of the denoising)."""
        return await respond(body, body.prompt if isinstance(body.prompt, list) else [body.prompt], "completion", request)

    @app.post("/v1/chat/completions", response_model=ChatResponse, responses=ERRORS)
    async def chat_completions(body: ChatRequest, request: Request):
        """Chat completion: the messages are formatted as plain ``Role: content`` lines followed by
        ``Assistant:`` (checkpoints carry no chat template), and the model continues the text."""
        return await respond(body, [chat_prompt(body.messages)], "chat", request)

    async def respond(body, prompts: list[str], kind: str, request: Request):
        if body.model != engine.name:
            raise RequestError(f"model {body.model!r} is not served here; this server serves {engine.name!r}", "model", 404, "model_not_found")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        params = Params(prompts, body.max_tokens, body.n, body.temperature, body.top_p, stop, body.seed, body.sampler, body.steps,
                        body.block_length, body.threshold, body.cfg_scale, body.cache, getattr(body, "infill", False))
        if body.stream_canvas and not body.stream:
            raise RequestError("stream_canvas needs stream: true", "stream_canvas")
        job = engine.prepare(params)
        ticket = Ticket(time.monotonic() + engine.limits.timeout)
        await server.admit(ticket)
        ident = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if body.stream:
            return StreamingResponse(stream(job, ticket, ident, kind, body.stream_canvas), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        fut = server.start(job, ticket)
        while not fut.done():
            await asyncio.wait({fut}, timeout=0.5)
            if not fut.done() and await request.is_disconnected():
                ticket.cancel("client disconnected")
        try:
            choices, info = fut.result()
        except BaseException as exc:  # noqa: BLE001
            raise failure(exc) from None
        completion = sum(c.tokens for c in choices)
        out = {"id": ident, "created": int(time.time()), "model": engine.name,
               "usage": {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion, "total_tokens": job.prompt_tokens + completion},
               "nfe": info["nfe"], "steps": info["steps"], "seed": info["seed"]}
        if kind == "chat":
            out.update(object="chat.completion", choices=[
                {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason} for i, c in enumerate(choices)])
        else:
            out.update(object="text_completion", choices=[
                {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason} for i, c in enumerate(choices)])
        return out

    async def stream(job: Job, ticket: Ticket, ident: str, kind: str, canvas: bool):
        loop = asyncio.get_running_loop()
        frames: asyncio.Queue = asyncio.Queue()
        created = int(time.time())
        fut = server.start(job, ticket, lambda frame: loop.call_soon_threadsafe(frames.put_nowait, frame))
        fut.add_done_callback(lambda _: frames.put_nowait(None))
        rows = job.x.shape[0]
        sent, finished = [""] * rows, [False] * rows

        def chunk(index: int, text: str, reason: str | None) -> str:
            if kind == "chat":
                choice = {"index": index, "delta": {"content": text}, "finish_reason": reason}
                return _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": engine.name, "choices": [choice]})
            choice = {"text": text, "index": index, "logprobs": None, "finish_reason": reason}
            return _sse({"id": ident, "object": "text_completion", "created": created, "model": engine.name, "choices": [choice]})

        def advance(index: int, text: str, reason: str | None):
            if text.startswith(sent[index]) and (len(text) > len(sent[index]) or reason):
                out = chunk(index, text[len(sent[index]):], reason)
                sent[index] = text
                finished[index] = reason is not None
                return out
            if reason:
                finished[index] = True
                return chunk(index, "", reason)
            return None

        try:
            if kind == "chat":
                for r in range(rows):
                    yield _sse({"id": ident, "object": "chat.completion.chunk", "created": created, "model": engine.name,
                                "choices": [{"index": r, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            while True:
                frame = await frames.get()
                if frame is None:
                    break
                if canvas:
                    yield _sse({"id": ident, "object": "canvas", "step": frame["step"], "nfe": frame["nfe"], "seconds": frame["seconds"],
                                "choices": frame["choices"]}, event="canvas")
                elif not frames.empty():
                    continue  # only the newest frame's text matters
                for r, ids in enumerate(frame["ids"]):
                    if not finished[r]:
                        text, reason, _ = engine.text_of(job, ids, final=False)
                        out = advance(r, text, reason)
                        if out:
                            yield out
            try:
                choices, _ = fut.result()
            except BaseException as exc:  # noqa: BLE001
                err = failure(exc)
                yield _sse({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": None}})
                return
            for r, c in enumerate(choices):
                if not finished[r]:
                    yield advance(r, c.text, c.finish_reason) or chunk(r, "", c.finish_reason)
            yield "data: [DONE]\n\n"
        finally:
            if not fut.done():
                ticket.cancel("client disconnected")

    return app
