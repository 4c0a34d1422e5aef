"""The serving app: models with their engines, the /v1 API, limits, access log, and the web app.

``create_app(settings)`` loads every model (one ``Engine`` each, started and
stopped with the app's lifespan), mounts the OpenAI-compatible router and
``GET /health``, and wraps everything in two plain ASGI middlewares:

- body limit: a request whose body is larger than ``max_body_bytes`` is answered
  413 before any route sees it, whether it declares a ``Content-Length`` or
  streams its body in chunks (the body is buffered up to the limit, then replayed);
- access log: one JSON line per request (time, method, path, status,
  duration_ms, client, key id, tokens), to ``settings.access_log`` or the
  ``chatforge.access`` logger. It names the key by a hash, never the key itself.

With ``settings.db_url`` the feedback store is opened (migrated to the newest
schema), an ``admin`` user is created from ``admin_password`` when there is no
admin yet, and the web app's routes and pages are mounted.

Model ids: ``<run>-<stage>`` for ``runs/<run>/finetune/<stage>/model``,
``<run>-pretrain`` for ``runs/<run>/pretrain/model``, else the directory name,
or NAME from ``NAME=PATH``. The version is the first 12 hex digits of the
weights' sha256, so a feedback row records exactly which weights produced it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatforge import __version__
from chatforge.errors import ChatforgeError
from chatforge.io import sha256_file
from chatforge.serve.engine import Engine
from chatforge.serve.openai_api import APIError, RateLimiter, api_error_handler, router

__all__ = ["ServeSettings", "ServeState", "ServedModel", "UnknownModel", "create_app", "load_models",
           "model_id_for", "model_version"]

access_logger = logging.getLogger("chatforge.access")


@dataclass
class ServedModel:
    id: str
    version: str  # first 12 hex of sha256(model.safetensors)
    path: Path
    engine: Engine
    context: int  # the model's block_size
    created: int = 0  # weights' modification time (unix seconds), for /v1/models


@dataclass
class ServeSettings:
    models: list[tuple[str | None, Path]]
    db_url: str | None = None  # None: API only, no web app / store
    api_keys: tuple[str, ...] = ()  # empty: /v1 needs no key (bind to loopback)
    max_batch: int = 16
    max_queue: int = 64
    max_prompt_tokens: int | None = None  # default: the model's context
    max_body_bytes: int = 1_000_000
    rate_limit_per_minute: int = 120  # per key or client IP; 0 = off
    access_log: Path | None = None
    device: str = "auto"
    dtype: str = "auto"  # the engines' forward precision (see Engine)
    admin_password: str | None = None


class UnknownModel(ChatforgeError):
    """A request named a model this server does not serve."""


@dataclass
class ServeState:
    settings: ServeSettings
    models: dict[str, ServedModel]
    default_model: str = ""  # "": the first model
    store: Any = None  # chatforge.store.db.Store when settings.db_url is set
    limiter: RateLimiter = field(init=False)

    def __post_init__(self) -> None:
        if not self.models:
            raise ChatforgeError("no models to serve")
        if not self.default_model:
            self.default_model = next(iter(self.models))
        if self.default_model not in self.models:
            raise ChatforgeError(f"default model {self.default_model!r} is not served; models: {', '.join(self.models)}")
        self.limiter = RateLimiter(self.settings.rate_limit_per_minute)

    def model(self, model_id: str | None) -> ServedModel:
        """The model called ``model_id`` (None: the default one)."""
        if model_id is None:
            return self.models[self.default_model]
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModel(f"model {model_id!r} does not exist; available: {', '.join(self.models)}") from None


# --------------------------------------------------------------------------- loading


def model_id_for(path: Path) -> str:
    """``<run>-<stage>`` / ``<run>-pretrain`` for a run's models, else the directory name."""
    parts = Path(os.path.abspath(path)).parts
    if len(parts) >= 4 and parts[-1] == "model" and parts[-3] == "finetune":
        return f"{parts[-4]}-{parts[-2]}"
    if len(parts) >= 3 and parts[-1] == "model" and parts[-2] == "pretrain":
        return f"{parts[-3]}-pretrain"
    return parts[-1]


def model_version(path: Path) -> str:
    """First 12 hex digits of the sha256 of the model's weights."""
    from chatforge.train.checkpoint import WEIGHTS

    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise ChatforgeError(f"{path}: {WEIGHTS} is missing: not a chatforge model directory")
    return sha256_file(weights)[:12]


def load_models(settings: ServeSettings) -> dict[str, ServedModel]:
    """Load every model of ``settings`` onto its device, each with an (unstarted) engine."""
    from chatforge.train.checkpoint import WEIGHTS, load_model
    from chatforge.train.precision import resolve_device

    if not settings.models:
        raise ChatforgeError("no models to serve: give at least one model directory")
    device = resolve_device(settings.device)
    out: dict[str, ServedModel] = {}
    for name, path in settings.models:
        path = Path(path)
        mid = name or model_id_for(path)
        if not mid.strip():
            raise ChatforgeError(f"{path}: empty model name")
        if mid in out:
            raise ChatforgeError(f"two models are named {mid!r} ({out[mid].path} and {path}); "
                                 "name them on the command line as NAME=PATH")
        model, tok, _ = load_model(path, device)
        engine = Engine(model, tok, max_batch=settings.max_batch, max_queue=settings.max_queue,
                        dtype=settings.dtype)
        out[mid] = ServedModel(mid, model_version(path), path, engine, model.config.block_size,
                               created=int((path / WEIGHTS).stat().st_mtime))
    return out


def _ensure_admin(store: Any, password: str) -> None:
    from chatforge.store import service

    users = service.list_users(store)
    if any(u["role"] == "admin" for u in users):
        return
    if any(u["username"] == "admin" for u in users):
        raise ChatforgeError("a user named 'admin' exists but is not an admin; give it the admin role "
                             "(chatforge store set-role) or drop --admin-password")
    service.create_user(store, "admin", password, "admin")


# --------------------------------------------------------------------------- middlewares


def _error_body(path: str, status: int, message: str, code: str) -> dict[str, Any]:
    """OpenAI's error shape under /v1, the web app's {"error": message} elsewhere."""
    if path.startswith("/v1"):
        return APIError(status, message, code=code).body()
    return {"error": message}


class BodyLimitMiddleware:
    """413 for request bodies over ``max_bytes`` (declared or streamed); 0 = no limit."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.max_bytes <= 0:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send, f"{int(declared)} bytes")
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left before sending its body
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_bytes:
                await self._reject(scope, receive, send, f"more than {self.max_bytes} bytes")
                return
            chunks.append(body)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # then disconnect detection as usual

        await self.app(scope, replay, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send, got: str) -> None:
        msg = f"request body too large: {got}; the limit is {self.max_bytes} bytes"
        response = JSONResponse(_error_body(scope.get("path", ""), 413, msg, "request_too_large"), status_code=413,
                                headers={"Connection": "close"})
        await response(scope, receive, send)


class AccessLogMiddleware:
    """One JSON line per HTTP request, written when the response (stream included) has ended."""

    def __init__(self, app: ASGIApp, path: Path | None = None) -> None:
        self.app, self.path = app, Path(path) if path is not None else None
        self._lock = threading.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        status = 500  # unless a response starts

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        state = scope.setdefault("state", {})
        try:
            await self.app(scope, receive, send_status)
        finally:
            client = scope.get("client")
            self.write({
                "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "method": scope.get("method"),
                "path": scope.get("path"),
                "status": status,
                "duration_ms": round((time.perf_counter() - t0) * 1000, 1),
                "client": client[0] if client else None,
                "key_id": state.get("key_id"),
                "tokens": state.get("tokens"),
            })

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False)
        if self.path is None:
            access_logger.info(line)
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:  # one write per line: lines never interleave
                f.write(line + "\n")


# --------------------------------------------------------------------------- the app


def create_app(settings: ServeSettings, state: ServeState | None = None) -> FastAPI:
    """The FastAPI app; models load now (unless ``state`` is given), engines run with the lifespan."""
    if state is None:
        state = ServeState(settings, load_models(settings))
    if settings.db_url and state.store is None:
        from chatforge.store.db import Store

        state.store = Store(settings.db_url)
        if settings.admin_password:
            _ensure_admin(state.store, settings.admin_password)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        started = []
        for m in state.models.values():
            if not m.engine.running:
                m.engine.start()
                started.append(m.engine)
        try:
            yield
        finally:
            for engine in started:
                await run_in_threadpool(engine.stop)

    app = FastAPI(title="chatforge", version=__version__, lifespan=lifespan, redoc_url=None)
    app.state.cf = state
    app.add_exception_handler(APIError, api_error_handler)
    app.include_router(router)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(state.models),
                "engine": {mid: m.engine.stats() for mid, m in state.models.items()}}

    if settings.db_url:
        from chatforge.serve.web import mount_web

        mount_web(app, state)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(AccessLogMiddleware, path=settings.access_log)  # outermost: logs the 413s too
    return app
