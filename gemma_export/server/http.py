"""The HTTP layer: OpenAI's completions and chat completions over the engine, plus /health,
/v1/models and /metrics. Starlette (no FastAPI: the validation is a small hand-written
module, so pydantic would only add weight). This module parses, validates, tokenizes and
streams; it never touches the model. The event loop never blocks on the model: the
engine calls back from its own thread, and `loop.call_soon_threadsafe` puts each event
into the request's asyncio queue.

Every route goes through `_endpoint`, the one place that checks the API key and turns an
exception into an OpenAI error body ({"error": {"message", "type", "param", "code"}}).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gemma_export.errors import RuntimeConfigError
from gemma_export.runtime.generate import SamplingConfig
from gemma_export.runtime.tokenizer import chat_format, format_chat
from gemma_export.server.engine import (
    Engine,
    Event,
    PromptTooLongError,
    QueueFullError,
    ShuttingDownError,
)
from gemma_export.server.metrics import ServerMetrics
from gemma_export.server.openai_schema import (
    ApiError,
    Sampling,
    check_budget,
    parse_chat,
    parse_completion,
)

log = logging.getLogger("gemma_export.server")

RETRY_AFTER_S = 1  # what a 429 tells the client to wait


@dataclass
class Settings:
    model_name: str
    api_key: str | None = None
    cors_origins: tuple[str, ...] = ()
    log_prompts: bool = False
    # called (on the loading thread) when the model fails to load; the CLI stops the server
    on_load_error: Callable[[BaseException], None] = lambda e: None


@dataclass
class _State:
    engine: Engine | None = None
    load_error: BaseException | None = None
    created: int = field(default_factory=lambda: int(time.time()))


# -- the one error mapping ------------------------------------------------------------------------


def _as_api_error(e: BaseException) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, QueueFullError):
        return ApiError(429, str(e), code="queue_full", type_="rate_limit_error",
                        headers={"Retry-After": str(RETRY_AFTER_S)})
    if isinstance(e, ShuttingDownError):
        return ApiError(503, str(e), code="shutting_down", type_="server_error")
    if isinstance(e, PromptTooLongError):
        return ApiError(400, str(e), param="prompt", code="context_length_exceeded")
    if isinstance(e, RuntimeConfigError):  # SamplingConfig.validate: a value the schema let through
        return ApiError(400, str(e), code="invalid_value")
    if isinstance(e, HTTPException):
        return ApiError(e.status_code, str(e.detail), code="not_found" if e.status_code == 404 else None)
    log.exception("unhandled error", exc_info=e)
    return ApiError(500, f"internal error: {type(e).__name__}", type_="server_error", code="internal_error")


def _error_response(e: BaseException) -> JSONResponse:
    err = _as_api_error(e)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _endpoint(route: str, metrics: ServerMetrics, settings: Settings, *, auth: bool = True):
    """Wrap a handler: API key check, error mapping, requests-by-status metric."""

    def wrap(handler: Callable[[Request], Awaitable[Response]]):
        async def endpoint(request: Request) -> Response:
            try:
                if auth and settings.api_key is not None:
                    _check_key(request, settings.api_key)
                response = await handler(request)
            except Exception as e:
                response = _error_response(e)
            metrics.request(route, response.status_code)
            return response

        return endpoint

    return wrap


def _check_key(request: Request, key: str) -> None:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                       code="invalid_api_key", type_="authentication_error")


# -- the app ------------------------------------------------------------------------------------


def create_app(load: Callable[[], Engine], settings: Settings, metrics: ServerMetrics | None = None) -> Starlette:
    """The ASGI app. `load` builds the engine (on a thread, so /health answers 503 while
    the model loads); the engine starts once it returns and stops at shutdown."""
    metrics = metrics or ServerMetrics()
    state = _State()

    def _load() -> None:
        try:
            engine = load()
            engine.obs = metrics
            engine.start()
            state.engine = engine
            log.info("model loaded; serving %s", settings.model_name)
        except BaseException as e:  # noqa: BLE001 (reported to the CLI, which exits 1)
            state.load_error = e
            log.error("loading the model failed: %s", e)
            settings.on_load_error(e)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        threading.Thread(target=_load, name="gemma-export-load", daemon=True).start()
        yield
        if state.engine is not None:
            await asyncio.get_running_loop().run_in_executor(None, state.engine.stop, 30.0)

    def engine() -> Engine:
        if state.engine is None:
            raise ApiError(503, "the model is still loading", code="loading", type_="server_error")
        return state.engine

    ep = lambda route, **kw: _endpoint(route, metrics, settings, **kw)  # noqa: E731

    @ep("/health", auth=False)
    async def health(request: Request) -> Response:
        if state.engine is None:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @ep("/metrics")
    async def metrics_route(request: Request) -> Response:
        body, ctype = metrics.render()
        return Response(body, media_type=ctype)

    @ep("/v1/models")
    async def models(request: Request) -> Response:
        eng = engine()
        return JSONResponse({"object": "list", "data": [{
            "id": settings.model_name, "object": "model", "created": state.created, "owned_by": "gemma-export",
            "max_model_len": eng.max_length,
        }]})

    @ep("/v1/completions")
    async def completions(request: Request) -> Response:
        eng = engine()
        req = parse_completion(await _json(request), eng.session.vocab_size)
        if isinstance(req.prompt, str):
            ids = eng.tokenizer.encode(req.prompt, add_bos=True)
        else:
            ids = list(req.prompt)
        if settings.log_prompts:
            log.info("completion prompt: %r", req.prompt)
        return await _generate(request, eng, ids, req.sampling, "prompt", _CompletionFormat(settings.model_name))

    @ep("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        eng = engine()
        req = parse_chat(await _json(request))
        try:
            text = format_chat(req.messages, fmt=chat_format(eng.session.config.get("family")))
        except Exception as e:  # RuntimeConfigError: roles out of order
            raise ApiError(400, str(e), param="messages", code="invalid_value") from None
        if settings.log_prompts:
            log.info("chat prompt: %r", text)
        ids = eng.tokenizer.encode(text, add_bos=True)
        return await _generate(request, eng, ids, req.sampling, "messages", _ChatFormat(settings.model_name))

    async def not_found(request: Request, exc: Exception) -> Response:
        return _error_response(exc)

    middleware = []
    if settings.cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                     allow_methods=["GET", "POST", "OPTIONS"],
                                     allow_headers=["Authorization", "Content-Type"]))
    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics_route, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
    ]
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan,
                    exception_handlers={HTTPException: not_found})
    app.state.server = state
    return app


async def _json(request: Request):
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", code="invalid_json") from None


# -- generation ----------------------------------------------------------------------------------


async def _generate(request: Request, eng: Engine, ids: list[int], s: Sampling, param: str, fmt) -> Response:
    n = check_budget(len(ids), s.max_tokens, eng.max_length, param)
    cfg = SamplingConfig(max_new_tokens=n, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                         repetition_penalty=s.repetition_penalty, seed=s.seed, stop=s.stop, ignore_eos=s.ignore_eos)
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[Event] = asyncio.Queue()

    def put(ev: Event) -> None:  # engine thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, ev)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            pass

    handle = eng.submit(ids, cfg, put)
    rid = fmt.new_id()
    if s.stream:
        return StreamingResponse(_sse(events, handle, fmt, rid, s.include_usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    watch = asyncio.create_task(_cancel_on_disconnect(request, handle))
    try:
        pieces = []
        while True:
            ev = await events.get()
            pieces.append(ev.text)
            if ev.finish_reason:
                break
    finally:
        watch.cancel()
        handle.cancel()  # no-op once finished
    if ev.finish_reason == "error":
        raise ApiError(500, f"generation failed: {ev.error}", type_="server_error", code="generation_failed")
    if ev.finish_reason == "cancelled":
        raise ShuttingDownError()
    return JSONResponse(fmt.whole(rid, "".join(pieces), ev))


async def _cancel_on_disconnect(request: Request, handle) -> None:
    """A non-streaming client that hangs up frees its slot too."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            handle.cancel()
            return


async def _sse(events: asyncio.Queue, handle, fmt, rid: str, include_usage: bool):
    def data(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    try:
        first = fmt.first_chunk(rid)
        if first is not None:
            yield data(first)
        while True:
            ev = await events.get()
            if ev.text:
                yield data(fmt.chunk(rid, ev.text, None))
            if ev.finish_reason:
                break
        if ev.finish_reason in ("error", "cancelled"):
            err = ApiError(500, f"generation failed: {ev.error}", type_="server_error", code="generation_failed") \
                if ev.finish_reason == "error" else _as_api_error(ShuttingDownError())
            yield data(err.body())
        else:
            yield data(fmt.chunk(rid, "", ev.finish_reason))
            if include_usage:
                yield data(fmt.usage_chunk(rid, ev))
        yield "data: [DONE]\n\n"
    finally:  # also when the client disconnects (Starlette cancels this generator)
        handle.cancel()


def _usage(ev: Event) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


class _CompletionFormat:
    """Response bodies of /v1/completions."""

    def __init__(self, model: str):
        self.model = model

    def new_id(self) -> str:
        return f"cmpl-{uuid.uuid4().hex}"

    def _head(self, rid):
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.model}

    def whole(self, rid, text, ev):
        return self._head(rid) | {"choices": [{"index": 0, "text": text, "finish_reason": ev.finish_reason,
                                               "logprobs": None}], "usage": _usage(ev)}

    def first_chunk(self, rid):
        return None

    def chunk(self, rid, text, finish_reason):
        return self._head(rid) | {"choices": [{"index": 0, "text": text, "finish_reason": finish_reason,
                                               "logprobs": None}]}

    def usage_chunk(self, rid, ev):
        return self._head(rid) | {"choices": [], "usage": _usage(ev)}


class _ChatFormat(_CompletionFormat):
    """Response bodies of /v1/chat/completions."""

    def new_id(self) -> str:
        return f"chatcmpl-{uuid.uuid4().hex}"

    def _head(self, rid, chunk=True):
        return {"id": rid, "object": "chat.completion.chunk" if chunk else "chat.completion",
                "created": int(time.time()), "model": self.model}

    def whole(self, rid, text, ev):
        return self._head(rid, chunk=False) | {"choices": [{
            "index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": ev.finish_reason,
            "logprobs": None}], "usage": _usage(ev)}

    def first_chunk(self, rid):
        return self._head(rid) | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                               "finish_reason": None, "logprobs": None}]}

    def chunk(self, rid, text, finish_reason):
        delta = {"content": text} if text else {}
        return self._head(rid) | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                                               "logprobs": None}]}

    def usage_chunk(self, rid, ev):
        return self._head(rid) | {"choices": [], "usage": _usage(ev)}
