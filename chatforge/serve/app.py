"""The serving app: composes the models and their engines, the /v1 API, the web app, and the guards.

``create_app(settings)`` loads every model (one ``Engine`` each, started and stopped
with the app's lifespan), mounts the OpenAI-compatible router (``openai_api``),
``GET /health`` and, with a database, the web app (``web``); both routers share
``state`` and ``fields`` and know nothing of each other. Everything is wrapped in
plain ASGI middlewares, outermost first:

- access log: one JSON line per request (time, method, path, status, duration_ms,
  client, key id, tokens), to ``settings.access_log`` or the ``chatforge.access``
  logger. It names the key by a hash, never the key itself; the client is the
  socket's peer unless a trusted proxy said otherwise (``uvicorn_options``);
- Host allow-list: a request whose ``Host`` is not a loopback name, an IP literal or
  one of ``settings.allowed_hosts`` is answered 400. A DNS-rebinding page (its own
  name resolved to this machine) always sends its own name, so it cannot read
  answers; the app also never builds a redirect from ``Host`` (no slash redirects);
- body limit: a request whose body is larger than ``max_body_bytes`` is answered
  413 before any route sees it, whether it declares a ``Content-Length`` or
  streams its body in chunks (the body is buffered up to the limit, then replayed).

``/docs`` and ``/openapi.json`` exist only with ``settings.docs`` (``--docs``), and
then serve Swagger UI from the installed ``swagger-ui-bundle`` package (``docs``).

With ``settings.guard_policy`` the safety guard (``guard.Guard``) is loaded onto ``state.guard``
(unless the caller set one): both routers check prompts and filter answers through it.

With ``settings.db_url`` the feedback store is opened (migrated to the newest
schema), an ``admin`` user is created from ``admin_password`` when there is no
admin yet, and the web app's routes and pages are mounted.

Model ids: ``<run>-<stage>`` for a stage's newest model (``runs/<run>/finetune/<stage>/model``,
``runs/<run>/pretrain/model``), ``<run>-<stage>@<version>`` for an older one kept in
``<stage dir>/versions/<version>``, else the directory name, or NAME from ``NAME=PATH``.
The version is the first 12 hex digits of the weights' sha256, so a feedback row
records exactly which weights produced it.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from chatforge import __version__
from chatforge.errors import ChatforgeError
from chatforge.io import dumps_line, sha256_file
from chatforge.paths import MODEL, stage_of_model_dir
from chatforge.serve.engine import Engine
from chatforge.serve.fields import FieldError
from chatforge.serve.openai_api import api_error_handler, field_error, router
from chatforge.serve.state import APIError, ServedModel, ServeSettings, ServeState, UnknownModel
from chatforge.serve.tokenize_api import tokenizer_router

__all__ = ["ServeSettings", "ServeState", "ServedModel", "UnknownModel", "create_app", "host_allowed",
           "load_models", "model_id_for", "model_version", "uvicorn_options"]

access_logger = logging.getLogger("chatforge.access")


# --------------------------------------------------------------------------- loading


def model_id_for(path: Path) -> str:
    """``<run>-<stage>`` for a stage's ``model/``, ``<run>-<stage>@<version>`` for its
    ``versions/<version>/``, else the directory name."""
    located = stage_of_model_dir(path)
    if located is None:
        return Path(os.path.abspath(path)).name
    run_dir, subdir = located
    base = f"{run_dir.name}-{PurePosixPath(subdir).name}"
    directory = Path(path).resolve()
    return base if directory.name == MODEL else f"{base}@{directory.name}"


def model_version(path: Path) -> str:
    """First 12 hex digits of the sha256 of the model's weights."""
    from chatforge.train.checkpoint import WEIGHTS

    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise ChatforgeError(f"{path}: {WEIGHTS} is missing: not a chatforge model directory")
    return sha256_file(weights)[:12]


def load_models(settings: ServeSettings) -> dict[str, ServedModel]:
    """Load every model of ``settings`` onto its device, each with an (unstarted) engine."""
    from chatforge.device import resolve_device
    from chatforge.model.quantize import quantize_model
    from chatforge.train.checkpoint import WEIGHTS, load_model

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
        model = quantize_model(model, settings.quantize)
        engine = Engine(model, tok, max_batch=settings.max_batch, max_queue=settings.max_queue,
                        dtype=settings.dtype, compile=settings.compile)
        out[mid] = ServedModel(mid, model_version(path), path, engine, model.config.block_size,
                               created=int((path / WEIGHTS).stat().st_mtime))
    return out


def _run_dir(state: ServeState) -> Path | None:
    """The run of the first served model that belongs to one (a guard's relative classifier path is under it)."""
    for m in state.models.values():
        located = stage_of_model_dir(m.path)
        if located is not None:
            return located[0]
    return None


def _ensure_admin(store: Any, password: str) -> None:
    from chatforge.store import service

    users = service.list_users(store)
    if any(u["role"] == "admin" for u in users):
        return
    if any(u["username"] == "admin" for u in users):
        raise ChatforgeError("a user named 'admin' exists but is not an admin; give it the admin role "
                             "(chatforge feedback users set-role admin admin) or drop --admin-password")
    service.create_user(store, "admin", password, "admin")


# --------------------------------------------------------------------------- middlewares


def _error_body(path: str, status: int, message: str, code: str | None = None,
                field: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape under /v1, the web app's {"error": message[, "field"]} elsewhere."""
    if path.startswith("/v1"):
        return APIError(status, message, code=code, param=field).body()
    return {"error": message, **({"field": field} if field is not None else {})}


async def field_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """A bad body or field (``fields.FieldError``) in the shape of the router it came from."""
    assert isinstance(exc, FieldError)
    if request.url.path.startswith("/v1"):
        return field_error(exc).response()
    return JSONResponse(_error_body(request.url.path, exc.status, exc.message, field=exc.field),
                        status_code=exc.status)


def host_allowed(host: str, allowed: tuple[str, ...] = ()) -> bool:
    """Whether a ``Host`` header names this server: an IP literal, ``localhost`` (and ``*.localhost``,
    which browsers resolve to loopback themselves), or an entry of ``allowed`` (``name``,
    ``*.domain`` for its subdomains, ``*`` for any). An empty Host (HTTP/1.0) is allowed."""
    host = host.strip().lower()
    if not host:
        return True
    if host.startswith("["):  # [v6]:port
        name = host[1:host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    name = name.rstrip(".")
    try:
        ipaddress.ip_address(name)
        return True  # a rebinding page sends its own *name*; an address literal is this server's own origin
    except ValueError:
        pass
    if name == "localhost" or name.endswith(".localhost"):
        return True
    for pattern in allowed:
        pattern = pattern.strip().lower().rstrip(".")
        if pattern == "*" or name == pattern or (pattern.startswith("*.") and name.endswith(pattern[1:])):
            return True
    return False


class HostGuardMiddleware:
    """400 for a request whose ``Host`` is not allowed (``host_allowed``): DNS-rebinding defence."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...] = ()) -> None:
        self.app, self.allowed = app, tuple(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        host = next((v.decode("latin-1") for k, v in scope.get("headers") or [] if k == b"host"), "")
        if host_allowed(host, self.allowed):
            await self.app(scope, receive, send)
            return
        shown = host[:100]
        msg = (f"Host {shown!r} is not allowed: this server answers to loopback names and IP addresses; "
               f"start it with --allowed-hosts {shown.rsplit(':', 1)[0] or 'NAME'} to serve it under that name")
        response = JSONResponse(_error_body(scope.get("path", ""), 400, msg, "host_not_allowed"), status_code=400)
        await response(scope, receive, send)


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
        line = dumps_line(record)
        if self.path is None:
            access_logger.info(line)
            return
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as f:  # one write per line: lines never interleave
                f.write(line + "\n")


# --------------------------------------------------------------------------- the app


def uvicorn_options(settings: ServeSettings) -> dict[str, Any]:
    """The uvicorn settings that go with ``settings``: ``X-Forwarded-For`` / ``-Proto`` are believed
    only from the proxies in ``forwarded_allow_ips`` (uvicorn's own default would believe any
    loopback client, so a local client could claim any address and escape every per-address limit)."""
    trusted = [ip for ip in settings.forwarded_allow_ips if ip]
    return {"proxy_headers": bool(trusted), "forwarded_allow_ips": trusted or None, "server_header": False}


def create_app(settings: ServeSettings, state: ServeState | None = None) -> FastAPI:
    """The FastAPI app; models load now (unless ``state`` is given), engines run with the lifespan."""
    if state is None:
        state = ServeState(settings, load_models(settings))
    if settings.guard_policy and state.guard is None:
        from chatforge.serve.guard import Guard

        state.guard = Guard.load(settings.guard_policy, base_dir=_run_dir(state))
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

    # No docs unless asked for; no slash redirects (Starlette builds them from the Host header).
    app = FastAPI(title="chatforge", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url="/openapi.json" if settings.docs else None, redirect_slashes=False)
    app.state.cf = state
    app.add_exception_handler(APIError, api_error_handler)
    app.add_exception_handler(FieldError, field_error_handler)
    app.include_router(router)
    app.include_router(tokenizer_router)  # /tokenize etc. at the root, as vLLM (lm-eval's remote tokenizer)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "models": list(state.models),
                "engine": {mid: m.engine.stats() for mid, m in state.models.items()}}

    if settings.docs:
        from chatforge.serve.docs import mount_docs

        mount_docs(app)
    if settings.db_url:
        from chatforge.serve.web import mount_web

        mount_web(app, state)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(HostGuardMiddleware, allowed=settings.allowed_hosts)
    app.add_middleware(AccessLogMiddleware, path=settings.access_log)  # outermost: logs the 413s and 400s too
    return app
