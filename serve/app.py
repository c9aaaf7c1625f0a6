"""The FastAPI application: routes, auth, error mapping, lifespan, and ``run()``.

Owns HTTP only. Each route takes its handler from ``app.state`` and is a few lines; all OpenAI
logic lives in ``serving_*``, all batching in the engine. The engine may be handed in ready-made
(tests) or built by a ``loader`` in a background thread at start-up (the CLI): the server listens
at once and ``/health`` answers 503 until the model is compiled and ready. Every error, including
unknown routes, validation failures and unexpected faults, is an OpenAI-style error body.

Knows nothing about how the engine schedules or how the model computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import EngineClient
from .metrics import Metrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from .serving_base import ServingError
from .serving_chat import OpenAIServingChat
from .serving_completions import OpenAIServingCompletion

log = logging.getLogger(__name__)

Loader = Callable[[], tuple[EngineClient, Any]]   # -> (started engine, tokenizer)
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, param=param, code=status,
                                         type=ERROR_TYPES.get(status, "server_error")))
    return JSONResponse(body.model_dump(), status_code=status)


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")


class _CountRequests:
    """ASGI middleware counting HTTP responses by route and status (streaming-safe); unknown
    paths share the label ``other`` so clients cannot grow the label set."""

    def __init__(self, app, metrics: Metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.metrics.on_http(path if path in ROUTES else "other", status)


async def _cancel_on_disconnect(request: Request, coro):
    """Run ``coro`` unless the client goes away first (then cancel it: the engine aborts)."""
    task = asyncio.ensure_future(coro)

    async def disconnected():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
    if task.cancelled():
        return None
    return task.result()


def _install(app: FastAPI, engine: EngineClient, tokenizer, model_name: str) -> None:
    app.state.engine = engine
    app.state.chat = OpenAIServingChat(engine, tokenizer, model_name)
    app.state.completions = OpenAIServingCompletion(engine, tokenizer, model_name)


def create_app(engine: EngineClient | None = None, tokenizer=None, *, model_name: str = "ernie",
               api_key: str | None = None, loader: Loader | None = None,
               on_ready: Callable[[], None] | None = None) -> FastAPI:
    """Build the server app.

    Args:
      engine, tokenizer: a started engine and its tokenizer; or pass ``loader`` instead.
      model_name: the id served at ``/v1/models`` and accepted in ``model``.
      api_key: when set, ``/v1/*`` requires ``Authorization: Bearer <api_key>``.
      loader: builds ``(engine, tokenizer)`` in a background thread at start-up.
      on_ready: called once the engine is ready (the CLI prints its address).

    Example:
      >>> app = create_app(Engine(MockModel(), ByteTokenizer()).start(), ByteTokenizer())
      >>> uvicorn.run(app, host="127.0.0.1", port=8180)
    """
    if (engine is None) == (loader is None):
        raise ValueError("pass exactly one of engine or loader")

    def stats():
        eng = app.state.engine
        return eng.stats() if eng is not None else None

    metrics = Metrics(stats)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        thread = None
        if loader is not None:
            def load():
                try:
                    eng, tok = loader()
                except Exception as e:  # noqa: BLE001 - reported through /health
                    log.exception("loading the model failed")
                    app.state.load_error = e
                    return
                eng.observer = metrics
                _install(app, eng, tok, model_name)
                if on_ready:
                    on_ready()

            thread = threading.Thread(target=load, name="model-loader", daemon=True)
            thread.start()
        elif on_ready:
            on_ready()
        yield
        if thread is not None:
            thread.join(timeout=0.1)
        if loader is not None and app.state.engine is not None:
            app.state.engine.shutdown()

    app = FastAPI(title="jaxwint2 OpenAI-compatible server", lifespan=lifespan)
    app.state.engine = app.state.chat = app.state.completions = None
    app.state.load_error = None
    app.state.metrics = metrics
    if engine is not None:
        if hasattr(engine, "observer"):
            engine.observer = metrics
        _install(app, engine, tokenizer, model_name)
    app.add_middleware(_CountRequests, metrics=metrics)
    bearer = Depends(HTTPBearer(auto_error=False))

    def check_key(cred: HTTPAuthorizationCredentials | None = bearer) -> None:
        if api_key is None:
            return
        if cred is None or not secrets.compare_digest(cred.credentials.encode(),
                                                      api_key.encode()):
            raise ServingError(401, "Incorrect or missing API key (use 'Authorization: Bearer "
                               "<key>').", "authentication_error")

    def handler(name: str):
        h = getattr(app.state, name)
        if h is None or not app.state.engine.ready:
            raise ServingError(503, "the model is not ready yet", "service_unavailable")
        return h

    async def respond(request: Request, name: str, body):
        result = await _cancel_on_disconnect(request, handler(name).create(body))
        if result is None:      # client gone: nobody reads this
            return Response(status_code=499)
        if hasattr(result, "__aiter__"):
            return StreamingResponse(result, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return JSONResponse(result.model_dump())

    # ---- errors ----
    @app.exception_handler(ServingError)
    async def _serving_error(_: Request, e: ServingError):
        return JSONResponse(e.response().model_dump(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return _error(400, f"{loc}: {first.get('msg', 'invalid request')}" if loc
                      else first.get("msg", "invalid request"), loc or None)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, e: StarletteHTTPException):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(Exception)
    async def _internal_error(_: Request, e: Exception):
        log.exception("unhandled error")
        return _error(500, f"internal error: {type(e).__name__}")

    # ---- routes ----
    @app.get("/health")
    async def health():
        eng = app.state.engine
        if eng is not None and eng.ready:
            return {"status": "ok"}
        if app.state.load_error is not None:
            return _error(503, f"model failed to load: {app.state.load_error}")
        return _error(503, "the model is loading")

    @app.get("/metrics")
    async def metrics_endpoint():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(check_key)])
    async def models():
        eng = app.state.engine
        return ModelList(data=[ModelCard(id=model_name, max_model_len=eng.max_model_len
                                         if eng is not None else None)])

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat(body: ChatCompletionRequest, request: Request):
        return await respond(request, "chat", body)

    @app.post("/v1/completions", dependencies=[Depends(check_key)])
    async def completions(body: CompletionRequest, request: Request):
        return await respond(request, "completions", body)

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def run(*, loader: Loader, host: str = "127.0.0.1", port: int = 8180, model_name: str = "ernie",
        api_key: str | None = None, log_level: str = "info") -> None:
    """Serve until interrupted; prints ``listening on http://HOST:PORT`` once the model is ready."""
    import uvicorn

    sock = bind_socket(host, port)
    actual = sock.getsockname()[1]

    def ready():
        print(f"jaxwint2.serve: model {model_name!r} ready; listening on http://{host}:{actual}",
              flush=True)

    print(f"jaxwint2.serve: loading {model_name!r}; /health answers 503 until ready "
          f"(http://{host}:{actual})", file=sys.stderr, flush=True)
    app = create_app(loader=loader, model_name=model_name, api_key=api_key, on_ready=ready)
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
