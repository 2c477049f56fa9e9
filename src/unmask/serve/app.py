"""The HTTP API (FastAPI): OpenAI-style completions and chat completions, models, health, and the
page at ``/``. Request bodies are measured before they are parsed (``Limits.max_body_bytes``, 413
past it); checks and tokenisation run in a small thread pool and decoding in worker threads (one
per running request, at most ``Limits.max_active``), batched by the engine's scheduler, so the
event loop stays free: /health answers while requests are read, tokenised and decoded. Bad input is
answered with 4xx and an OpenAI-style error body naming the field; nothing a client sends produces
a 500.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic.json_schema import models_json_schema
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from unmask.errors import OptionError, UnmaskError
from unmask.serve.batcher import Cancelled, Ticket
from unmask.serve.compiler import COMPILER
from unmask.serve.engine import Engine, Job, Params, RequestError, refused
from unmask.serve.schemas import (
    CanvasFrame, ChatCompletionChunk, ChatRequest, ChatResponse, CompletionChunk, CompletionRequest, CompletionResponse, ErrorBody,
    Health, ModelCard, ModelList, constraint_of, guide_options, sampler_options,
)

STATIC = Path(__file__).with_name("static")
PREPARE_THREADS = 4  # requests checked and tokenised at once: bounds the memory a burst of long prompts takes
ERRORS = {400: {"model": ErrorBody, "description": "Invalid request: the error names the field (malformed JSON, a body that is not UTF-8, "
                                                   "unknown fields, wrong types, values out of range, text the tokenizer cannot take)"},
          404: {"model": ErrorBody, "description": "Unknown model"},
          413: {"model": ErrorBody, "description": "Request body larger than the server's max_body_bytes limit (see GET /v1/models)"},
          429: {"model": ErrorBody, "description": "Queue full"},
          499: {"model": ErrorBody, "description": "Cancelled: the client went away before the answer (no one receives it)"},
          504: {"model": ErrorBody, "description": "Request timed out"}}
ROLES = {"developer": "System"}  # OpenAI's newer name for the system role


def error_response(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def refusal(exc: RequestError) -> JSONResponse:
    return error_response(exc.status, exc.message, exc.param, exc.kind, exc.code)


def chat_prompt(messages) -> str:
    """Plain prompt formatting (checkpoints carry no chat template): one ``Role: content`` line per
    message (``Role (name): content`` for a named speaker; text parts joined by line breaks), then
    ``Assistant:``, which the model continues."""
    def line(m) -> str:
        role = ROLES.get(m.role, m.role.capitalize())
        text = m.content if isinstance(m.content, str) else "\n".join(part.text for part in m.content)
        return f"{role} ({m.name}): {text}\n" if m.name else f"{role}: {text}\n"

    return "".join(map(line, messages)) + "Assistant:"


def _sse(data: dict, event: str | None = None) -> str:
    return (f"event: {event}\n" if event else "") + f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class BodyLimit:
    """ASGI middleware: reads a POST body before the app parses it. Past ``max_bytes`` (declared by
    Content-Length, or counted as it arrives) the answer is 413 at once; a body that is not UTF-8
    (JSON's encoding) gets 400. The app then reads the body from memory."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        try:
            body = await self.read(scope, receive)
        except RequestError as exc:
            return await refusal(exc)(scope, receive, send)
        if body is None:
            return  # the client went away while sending
        pending = [{"type": "http.request", "body": body, "more_body": False}]

        async def replay():
            return pending.pop() if pending else await receive()

        await self.app(scope, replay, send)

    async def read(self, scope, receive) -> bytes | None:
        declared = Headers(scope=scope).get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            raise self.too_large(int(declared))
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                raise self.too_large(len(body), "at least ")
            if not message.get("more_body", False):
                break
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise RequestError(f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason}); send JSON encoded as UTF-8",
                               code="invalid_encoding") from None
        return bytes(body)

    def too_large(self, size: int, bound: str = "") -> RequestError:
        return RequestError(f"request body of {bound}{size} bytes exceeds this server's max_body_bytes limit of {self.max_bytes} bytes",
                            None, 413, code="body_too_large")


class Server:
    """The app's state: the engine, the worker threads and the admission counters."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.pool = ThreadPoolExecutor(engine.limits.max_active, thread_name_prefix="unmask-request")
        self.preparing = ThreadPoolExecutor(PREPARE_THREADS, thread_name_prefix="unmask-prepare")
        self.slots: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0
        self.served = 0
        self.cancelled = 0

    async def prepare(self, params: Params) -> Job:
        """The engine's checks and canvas of a request, off the event loop (tokenising a long prompt takes a while)."""
        return await asyncio.get_running_loop().run_in_executor(self.preparing, self.engine.prepare, params)

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
    if isinstance(exc, OptionError):
        return refused(exc)
    if isinstance(exc, (UnmaskError, RequestError)):
        return exc if isinstance(exc, RequestError) else RequestError(str(exc))
    raise exc


def renamed(exc: RequestError, names: dict[str, str]) -> RequestError:
    """``exc`` with the fields it names called as the client called them (chat: messages, not prompt)."""
    new = names.get(exc.param)
    if new is None:
        return exc
    return RequestError(re.sub(rf"\b{exc.param}\b", new, exc.message), new, exc.status, exc.kind, exc.code)


def validation_error(errors: list[dict]) -> RequestError:
    """The first problem pydantic found, naming the field. Where a field takes one of several types
    (a string or a list), the error inside the type the value has is preferred to the type mismatches."""
    first = next((e for e in errors if not e.get("type", "").endswith("_type")), errors[0] if errors else None)
    if first is None:
        return RequestError("invalid request")
    # pydantic names the member of a union it tried ('str', 'list[str]', 'TextPart', 'function-after[...]'): not a field
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and (isinstance(p, int) or re.fullmatch(r"[a-z_][a-z0-9_]*", p)
                                                                     and p not in ("str", "int", "float", "bool"))]
    kind = first.get("type", "")
    if kind == "json_invalid":
        return RequestError(f"malformed JSON body: {first.get('msg')}", code="json_invalid")
    param = loc[0] if loc and not loc[0].isdigit() else None
    where = ".".join(loc) or "body"
    if kind == "extra_forbidden":
        return RequestError(f"unknown field {where!r}", param, code="unknown_field")
    cause = first.get("ctx", {}).get("error")
    return RequestError(f"{where}: {cause if kind == 'value_error' and cause else first.get('msg')}", param, code=kind)


def streamed(chunk: type) -> dict:
    """The documented answers of a route that streams: its errors, and a 200 that is JSON or, with
    ``stream``, text/event-stream whose events' ``data`` are ``chunk``s."""
    refs = [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (chunk, CanvasFrame, ErrorBody)]
    events = {"schema": {
        "type": "object", "required": ["data"],
        "description": f"Server-sent events: a {chunk.__name__} per piece of committed text (with stream_canvas also `event: canvas` "
                       "CanvasFrame frames), an ErrorBody if decoding fails, then `data: [DONE]`.",
        "properties": {
            "event": {"type": "string", "enum": ["message", "canvas"],
                      "description": "`canvas` for a CanvasFrame; absent otherwise (an SSE client reads `message`)."},
            "data": {"type": "string", "description": "A JSON object, or `[DONE]` at the end.",
                     "if": {"const": "[DONE]"}, "else": {"contentMediaType": "application/json", "contentSchema": {"anyOf": refs}}},
        }}}
    return {200: {"content": {"text/event-stream": events}}, **ERRORS}


# request fields bounded by the server's limits: field -> (Limits attribute, JSON-schema keyword, type it applies to)
LIMITED = {"max_tokens": ("max_tokens", "maximum", "integer"), "max_completion_tokens": ("max_tokens", "maximum", "integer"),
           "n": ("max_n", "maximum", "integer"), "steps": ("max_steps", "maximum", "integer"), "prompt": ("max_prompts", "maxItems", "array"),
           "particles": ("max_particles", "maximum", "integer")}


def bound(schema: dict, limits) -> None:
    """Write the server's limits into a request schema (on the member of the right type of an anyOf)."""
    for name, (limit, keyword, kind) in LIMITED.items():
        prop = schema["properties"].get(name)
        if prop is not None:
            target = next((s for s in prop.get("anyOf", [prop]) if s.get("type") == kind), prop)
            target[keyword] = getattr(limits, limit)


def document(app: FastAPI, engine: Engine) -> dict:
    """The OpenAPI document, as the server answers: bad input is a 400 (never FastAPI's 422),
    streamed answers' events are described, ``model`` takes the served id and the fields the
    server's limits bound say so."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = FastAPI.openapi(app)
    for methods in doc["paths"].values():
        for operation in methods.values():
            operation["responses"].pop("422", None)
    schemas = doc["components"]["schemas"]
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    _, events = models_json_schema([(m, "serialization") for m in (CompletionChunk, ChatCompletionChunk, CanvasFrame)],
                                   ref_template="#/components/schemas/{model}")
    schemas.update(events["$defs"])
    for request in (CompletionRequest, ChatRequest):
        model = schemas[request.__name__]["properties"]["model"]
        model["enum"] = [engine.name]
        model["description"] += f" This server: {engine.name!r}."
        bound(schemas[request.__name__], engine.limits)
    return doc


def create_app(engine: Engine) -> FastAPI:
    """The FastAPI application serving ``engine``."""
    app = FastAPI(title="unmask", version="0.1.0", description=(
        "OpenAI-compatible completions from a masked diffusion (MDM) or autoregressive checkpoint. "
        "Concurrent requests are decoded together, one network forward per step."))
    server = Server(engine)
    app.state.server = server
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(BodyLimit, max_bytes=engine.limits.max_body_bytes)
    app.openapi = lambda: document(app, engine)
    add_error_handlers(app)
    add_info_routes(app, server)
    add_completion_routes(app, server)
    return app


def add_error_handlers(app: FastAPI) -> None:
    """Every refusal answered as an OpenAI-style error body: pydantic's findings as a 400 naming the
    field (never FastAPI's 422), Starlette's HTTP errors, the server's refusals and the library's errors."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return refusal(validation_error(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, "invalid_request_error" if exc.status_code < 500 else "server_error")

    @app.exception_handler(RequestError)
    async def refused(request: Request, exc: RequestError):
        return refusal(exc)

    @app.exception_handler(UnmaskError)
    async def unmask_error(request: Request, exc: UnmaskError):
        return error_response(400, str(exc))


def add_info_routes(app: FastAPI, server: Server) -> None:
    """The page at ``/``, /health and the models."""
    engine = server.engine

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    @app.get("/health", response_model=Health)
    async def health():
        """Answers while requests are read, tokenised and decoded: running and waiting requests, batching counters."""
        stats = dict(engine.scheduler.stats)
        stats["mean_requests_per_forward"] = stats["requests_per_forward"] / stats["forwards"] if stats["forwards"] else 0.0
        return {"status": "ok", "model": engine.name, "objective": engine.config.train.objective, "running": server.running,
                "waiting": server.waiting, "served": server.served, "cancelled": server.cancelled, "batching": stats,
                "constraints": dict(COMPILER.stats)}

    def card() -> dict:
        return {"id": engine.name, "object": "model", "created": 0, "owned_by": "unmask", "objective": engine.config.train.objective,
                "context_length": engine.context, "limits": vars(engine.limits),
                "rewards": {name: reward_kind(score) for name, score in engine.rewards.items()}}

    @app.get("/v1/models", response_model=ModelList)
    async def models():
        """The served model (one)."""
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model}", response_model=ModelCard, responses={404: ERRORS[404]})
    async def model(model: str):
        """The served model, by its id."""
        check_model(engine, model)
        return card()


def add_completion_routes(app: FastAPI, server: Server) -> None:
    """/v1/completions and /v1/chat/completions."""

    @app.post("/v1/completions", response_model=CompletionResponse, responses=streamed(CompletionChunk))
    async def completions(body: CompletionRequest, request: Request):
        """Text completion. MDM checkpoints take the diffusion fields; with ``stream`` the answer is
        server-sent events (``stream_canvas`` adds ``event: canvas`` frames of the denoising)."""
        return await respond(server, body, body.prompt if isinstance(body.prompt, list) else [body.prompt], body.max_tokens, request)

    @app.post("/v1/chat/completions", response_model=ChatResponse, responses=streamed(ChatCompletionChunk))
    async def chat_completions(body: ChatRequest, request: Request):
        """Chat completion: the messages are formatted as plain ``Role: content`` lines followed by
        ``Assistant:`` (checkpoints carry no chat template), and the model continues the text."""
        if body.max_completion_tokens is None:
            return await respond(server, body, [chat_prompt(body.messages)], body.max_tokens, request)
        if "max_tokens" in body.model_fields_set:
            raise RequestError("give max_completion_tokens or max_tokens (its older name), not both", "max_completion_tokens")
        return await respond(server, body, [chat_prompt(body.messages)], body.max_completion_tokens, request,
                             {"max_tokens": "max_completion_tokens"})


def reward_kind(score) -> str:
    """What a configured reward is, as a client may see it (its kind, not its path or pattern): ``ar
    (reward or energy)``, ``regex (reward)``, ..."""
    return f"{score.spec.partition(':')[0]} ({'reward or energy' if score.density else 'reward'})"


def check_model(engine: Engine, name: str) -> None:
    """Refuse (404) a model id other than the served one."""
    if name != engine.name:
        raise RequestError(f"model {name!r} is not served here; this server serves {engine.name!r}", "model", 404, "model_not_found")


async def respond(server: Server, body, prompts: list[str], max_tokens: int, request: Request, names: dict[str, str] | None = None):
    """The answer to a completion or chat request: checked, admitted, then decoded into one JSON
    body, or streamed. ``names``: the request fields the client called by other names than the
    decoding parameters' (errors name them as the client did)."""
    engine = server.engine
    check_model(engine, body.model)
    chat = isinstance(body, ChatRequest)
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    try:
        constraint = constraint_of(body)
    except OptionError as exc:
        raise refused(exc) from None
    params = Params(prompts, max_tokens, body.n, stop, body.seed, sampler_options(body), getattr(body, "infill", False), constraint,
                    guide_options(body))
    if body.stream_canvas and not body.stream:
        raise RequestError("stream_canvas needs stream: true", "stream_canvas")
    if body.stream_options is not None and not body.stream:
        raise RequestError("stream_options needs stream: true", "stream_options")
    try:
        job = await server.prepare(params)
    except RequestError as exc:
        raise renamed(exc, {**(names or {}), **({"prompt": "messages"} if chat else {})}) from None
    ticket = Ticket(time.monotonic() + engine.limits.timeout)
    await server.admit(ticket)
    ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    if body.stream:
        usage = body.stream_options is not None and body.stream_options.include_usage
        return StreamingResponse(stream(server, job, ticket, ident, chat, body.stream_canvas, usage), media_type="text/event-stream",
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
    return answer(engine, ident, job, choices, info, chat)


def answer(engine: Engine, ident: str, job: Job, choices: list, info: dict, chat: bool) -> dict:
    """The JSON body of a decoded request that did not stream (a chat or a text completion)."""
    out = {"id": ident, "created": int(time.time()), "model": engine.name, "usage": usage_of(job, choices),
           "nfe": info["nfe"], "steps": info["steps"], "seed": info["seed"]}
    if chat:
        out.update(object="chat.completion", choices=[
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason} for i, c in enumerate(choices)])
    else:
        out.update(object="text_completion", choices=[
            {"text": c.text, "index": i, "logprobs": None, "finish_reason": c.finish_reason} for i, c in enumerate(choices)])
    return out


def usage_of(job: Job, choices) -> dict:
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": job.prompt_tokens, "completion_tokens": completion, "total_tokens": job.prompt_tokens + completion}


async def stream(server: Server, job: Job, ticket: Ticket, ident: str, chat: bool, canvas: bool, include_usage: bool):
    """The server-sent events of a streamed request: chunks of newly committed text per choice (and,
    with ``canvas``, a frame after every step), an error body if decoding fails, then ``[DONE]``.
    Decoding is cancelled if the client goes away before the end."""
    engine = server.engine
    loop = asyncio.get_running_loop()
    frames: asyncio.Queue = asyncio.Queue()
    fut = server.start(job, ticket, lambda frame: loop.call_soon_threadsafe(frames.put_nowait, frame))
    fut.add_done_callback(lambda _: frames.put_nowait(None))
    rows = job.x.shape[0]
    sent, finished = [""] * rows, [False] * rows
    head = {"id": ident, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()), "model": engine.name}
    if include_usage:
        head["usage"] = None

    def event(choices: list[dict], **extra) -> str:
        return _sse({**head, "choices": choices, **extra})

    def chunk(index: int, text: str, reason: str | None) -> str:
        if chat:
            return event([{"index": index, "delta": {"content": text}, "finish_reason": reason}])
        return event([{"text": text, "index": index, "logprobs": None, "finish_reason": reason}])

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
        if chat:
            for r in range(rows):
                yield event([{"index": r, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
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
            yield _sse({"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}})
            return
        for r, c in enumerate(choices):
            if not finished[r]:
                yield advance(r, c.text, c.finish_reason) or chunk(r, "", c.finish_reason)
        if include_usage:
            yield event([], usage=usage_of(job, choices))
        yield "data: [DONE]\n\n"
    finally:
        if not fut.done():
            ticket.cancel("client disconnected")
