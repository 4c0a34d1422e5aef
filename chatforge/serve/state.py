"""What every part of the server shares: settings, the served models, the limits, the /v1 error type.

Both routers (``openai_api`` for /v1, ``web`` for the feedback app) and the app that
composes them (``app``) depend on this module; it depends on none of them, so the
serving modules form no import cycle (``tests/test_serve_layering.py`` checks).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse

from chatforge.errors import ChatforgeError
from chatforge.serve.limits import FailureThrottle, RateLimiter

if TYPE_CHECKING:
    from chatforge.serve.engine import Engine
    from chatforge.serve.guard import Guard

__all__ = ["APIError", "ServeSettings", "ServeState", "ServedModel", "UnknownModel", "client_address"]


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
    rate_limit_per_minute: int = 120  # requests per key or client address; 0 = every rate limit off
    rate_limit_tokens_per_minute: int = 200_000  # prompt + max_tokens x prompts, per key or address; 0 = off
    max_prompts_per_request: int = 32  # /v1/completions "prompt" lists
    max_inflight_per_request: int | None = None  # prompts of one request in the engine at once (None: max_batch/2)
    allowed_hosts: tuple[str, ...] = ()  # Host names beyond loopback names and IP literals ("*": any)
    forwarded_allow_ips: tuple[str, ...] = ()  # proxies whose X-Forwarded-For is believed (none by default)
    docs: bool = False  # serve /docs and /openapi.json
    session_idle_minutes: int = 60  # a web session unused this long ends (it lasts 7 days at most)
    access_log: Path | None = None
    device: str = "auto"
    dtype: str = "auto"  # the engines' forward precision (see Engine)
    quantize: str = "none"  # "int8": serve int8-quantised copies of the models (chatforge.model.quantize)
    compile: bool = False  # compile the engines' prefill for a few prompt-length buckets at start (Engine)
    admin_password: str | None = None
    guard_policy: str | None = None  # a safety policy TOML file or "default" (chatforge serve --guard); None: off

    @property
    def inflight_per_request(self) -> int:
        if self.max_inflight_per_request is not None:
            return max(1, self.max_inflight_per_request)
        return max(1, self.max_batch // 2)


class UnknownModel(ChatforgeError):
    """A request named a model this server does not serve."""


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def client_address(conn: HTTPConnection) -> str:
    """The client's address: the socket's peer, or what a trusted proxy said it was.

    uvicorn rewrites the connection's client from ``X-Forwarded-For`` only when the peer is
    one of ``--forwarded-allow-ips`` (see ``app.uvicorn_options``), so this is never a value
    an arbitrary client chose."""
    return conn.client.host if conn.client else "unknown"


@dataclass
class ServeState:
    settings: ServeSettings
    models: dict[str, ServedModel]
    default_model: str = ""  # "": the first model
    store: Any = None  # chatforge.store.db.Store when settings.db_url is set
    guard: Guard | None = None  # the safety guard (``serve.guard``), from settings.guard_policy; None: unguarded
    limiter: RateLimiter = field(init=False)  # requests per key / address
    token_limiter: RateLimiter = field(init=False)  # tokens per key / address
    login_throttle: FailureThrottle = field(init=False)  # per account + address
    key_throttle: FailureThrottle = field(init=False)  # wrong API keys, per address
    _key_lookup: tuple[Any, asyncio.Lock] | None = field(init=False, default=None)  # (event loop, lock)
    known_keys: dict[str, tuple[str, float]] = field(init=False)  # sha256(key) -> (ident, valid until)

    def __post_init__(self) -> None:
        if not self.models:
            raise ChatforgeError("no models to serve")
        if not self.default_model:
            self.default_model = next(iter(self.models))
        if self.default_model not in self.models:
            raise ChatforgeError(f"default model {self.default_model!r} is not served; models: {', '.join(self.models)}")
        per_minute = self.settings.rate_limit_per_minute
        self.limiter = RateLimiter(per_minute)
        self.token_limiter = RateLimiter(self.settings.rate_limit_tokens_per_minute if per_minute > 0 else 0)
        self.login_throttle = FailureThrottle()
        self.key_throttle = FailureThrottle()
        self.known_keys = {}

    def key_lookup(self) -> asyncio.Lock:
        """The lock that makes unknown-key lookups one at a time (see ``openai_api.identify``); one per
        event loop, since an asyncio lock belongs to the loop it first waited in."""
        loop = asyncio.get_running_loop()
        if self._key_lookup is None or self._key_lookup[0] is not loop:
            self._key_lookup = (loop, asyncio.Lock())
        return self._key_lookup[1]

    def model(self, model_id: str | None) -> ServedModel:
        """The model called ``model_id`` (None: the default one)."""
        if model_id is None:
            return self.models[self.default_model]
        try:
            return self.models[model_id]
        except KeyError:
            raise UnknownModel(f"model {model_id!r} does not exist; available: {', '.join(self.models)}") from None
