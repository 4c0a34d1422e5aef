"""The OpenAI-compatible API: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

Any OpenAI client (the ``openai`` SDK, LangChain, lm-evaluation-harness's
``local-completions``) works by pointing its base URL at ``http://HOST:PORT/v1``.
Responses, stream chunks and errors have OpenAI's exact shapes; fields we do not
implement are rejected with a 400 naming the field when they would change the
result (``n`` > 1, ``tools``, penalties), and ignored when they would not.

Streaming is Server-Sent Events: ``data: {chunk}\\n\\n`` per piece of text, then
``data: [DONE]\\n\\n``. When the client goes away (the stream task is cancelled,
or ``request.is_disconnected()`` says so between events) the request is cancelled
in the engine, so its slot goes to the next request at once.

Guard (a router dependency): an API key when ``settings.api_keys`` is set
(``Authorization: Bearer KEY``, compared in constant time) or a user key from the
feedback store; then a token bucket per key, or per client IP without one.

Extensions beyond OpenAI (as in vLLM): ``top_k`` and ``repetition_penalty``.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import hmac
import json
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from chatforge.chat.template import render_prompt, stop_token_ids
from chatforge.errors import ChatforgeError
from chatforge.serve.engine import MAX_LOGPROBS, GenerationHandle, PromptTooLong, QueueFull, SamplingParams

if TYPE_CHECKING:
    from chatforge.serve.app import ServedModel, ServeState

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP = 16  # OpenAI allows 4; a few more cost nothing
DEFAULT_COMPLETION_TOKENS = 16  # the legacy completions default


# --------------------------------------------------------------------------- errors


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


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Registered on the app for ``APIError`` (see ``create_app``)."""
    assert isinstance(exc, APIError)
    return exc.response()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- guard: keys and rate limit


class RateLimiter:
    """Token buckets: ``per_minute`` requests of burst, refilled at ``per_minute / 60`` per second."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._buckets: dict[str, tuple[float, float]] = {}  # id -> (tokens, last refill time)
        self._lock = threading.Lock()

    def check(self, ident: str) -> float:
        """0 if a request by ``ident`` may go now (and count it), else seconds until it may."""
        if self.per_minute <= 0:
            return 0.0
        rate, cap, now = self.per_minute / 60.0, float(self.per_minute), time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(ident, (cap, now))
            tokens = min(cap, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[ident] = (tokens - 1.0, now)
                return 0.0
            self._buckets[ident] = (tokens, now)
            if len(self._buckets) > 10_000:  # forget idle clients (their buckets would be full anyway)
                self._buckets = {k: v for k, v in self._buckets.items() if now - v[1] < 60.0}
            return (1.0 - tokens) / rate


def key_fingerprint(key: str) -> str:
    """A loggable name for a key: never the key itself."""
    return "key:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("api-key") or None  # Azure-style clients


async def identify(state: ServeState, key: str) -> str | None:
    """The id of a valid key ("key:<hash>" or "user:<name>"), or None."""
    given = key.encode("utf-8")
    match = False
    for k in state.settings.api_keys:  # compare with every key: the time does not tell which one matched
        match |= hmac.compare_digest(given, k.encode("utf-8"))
    if match:
        return key_fingerprint(key)
    if state.store is not None:
        from chatforge.store import service

        user = await run_in_threadpool(service.user_for_api_key, state.store, key)
        if user:
            return f"user:{user['username']}"
    return None


async def guard(request: Request) -> None:
    """Authenticate (when keys are configured) and rate-limit every /v1 request."""
    state: ServeState = request.app.state.cf
    key = _bearer(request)
    ident = await identify(state, key) if key else None
    if state.settings.api_keys and ident is None:
        msg = ("missing API key: send it as 'Authorization: Bearer KEY'" if key is None else
               "invalid API key")
        raise APIError(401, msg, param=None, code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    request.state.key_id = ident
    client = request.client.host if request.client else "unknown"
    wait = state.limiter.check(ident or f"ip:{client}")
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise APIError(429, f"rate limit of {state.settings.rate_limit_per_minute} requests per minute reached; "
                       f"retry in {retry} s", type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(retry)})


router = APIRouter(prefix="/v1", dependencies=[Depends(guard)])


# --------------------------------------------------------------------------- request fields


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _int(body: dict[str, Any], name: str, lo: int, hi: int | None = None, default: Any = None) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad_request(f"{name}: must be an integer {rng}, got {json.dumps(v)}", param=name)
    return v


def _float(body: dict[str, Any], name: str, lo: float, hi: float, default: Any = None,
           lo_open: bool = False) -> Any:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int | float) or not (lo < v if lo_open else lo <= v) or v > hi:
        rng = f"{'(' if lo_open else '['}{lo}, {hi}]"
        raise bad_request(f"{name}: must be a number in {rng}, got {json.dumps(v)}", param=name)
    return float(v)


def _bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"{name}: must be true or false, got {json.dumps(v)}", param=name)
    return v


def _unsupported(body: dict[str, Any], name: str, allowed: tuple[Any, ...], what: str) -> None:
    v = body.get(name)
    if v is not None and v not in allowed:
        raise bad_request(f"{name}: {what} (got {json.dumps(v)})", param=name)


def _sampling(body: dict[str, Any], max_tokens: int | None) -> SamplingParams:
    """The sampling fields both endpoints share; ``max_tokens`` is resolved by the caller."""
    _unsupported(body, "n", (1,), "only n=1 is supported; send several requests for several answers")
    _unsupported(body, "presence_penalty", (0, 0.0), "presence_penalty is not supported (use repetition_penalty)")
    _unsupported(body, "frequency_penalty", (0, 0.0), "frequency_penalty is not supported (use repetition_penalty)")
    _unsupported(body, "logit_bias", ({},), "logit_bias is not supported")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,) if stop else ()
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP:
        stops = tuple(s for s in stop if s)
    else:
        raise bad_request(f"stop: must be a string or a list of at most {MAX_STOP} strings, got {json.dumps(stop)}",
                          param="stop")
    top_k = body.get("top_k")
    if top_k in (0, -1):  # vLLM's spelling of "off"
        top_k = None
    else:
        top_k = _int(body, "top_k", 1)
    top_p = _float(body, "top_p", 0.0, 1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request(f"seed: must be an integer, got {json.dumps(seed)}", param="seed")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 0,
        temperature=_float(body, "temperature", 0.0, 2.0, default=1.0),
        top_p=None if top_p == 1.0 else top_p,
        top_k=top_k,
        repetition_penalty=_float(body, "repetition_penalty", 0.0, 10.0, default=1.0, lo_open=True),
        stop=stops,
        seed=seed,
    )


def _model(state: ServeState, body: dict[str, Any]) -> ServedModel:
    name = body.get("model")
    if name is not None and not isinstance(name, str):
        raise bad_request(f"model: must be a string, got {json.dumps(name)}", param="model")
    if name and name not in state.models:
        raise APIError(400, f"model {name!r} does not exist; available: {', '.join(state.models)}",
                       param="model", code="model_not_found")
    return state.model(name or None)


def _budget(served: ServedModel, state: ServeState, n_prompt: int, max_tokens: int | None,
            param: str) -> int:
    """Check the prompt fits; the completion budget (the rest of the context when not given)."""
    ctx = served.context
    limit = min(ctx, state.settings.max_prompt_tokens or ctx)
    if n_prompt > limit:
        raise APIError(400, f"the prompt has {n_prompt} tokens; this server accepts at most {limit} prompt tokens "
                       f"(model {served.id} has a context of {ctx} tokens)", param=param,
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = ctx - n_prompt
    if n_prompt + max_tokens > ctx:
        raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                       f"{n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} in the completion). "
                       "Please reduce the length of the prompt or the completion.", param=param,
                       code="context_length_exceeded")
    return max_tokens


def _submit(served: ServedModel, ids: list[int], params: SamplingParams, stops: list[int]) -> GenerationHandle:
    try:
        return served.engine.submit(ids, params, stops)
    except QueueFull as e:
        raise APIError(503, f"the server is busy: {e}", type="server_error", code="engine_overloaded",
                       headers={"Retry-After": "1"}) from None
    except PromptTooLong as e:
        raise APIError(400, str(e), param="max_tokens", code="context_length_exceeded") from None
    except ChatforgeError as e:
        raise bad_request(str(e)) from None


# --------------------------------------------------------------------------- shared response pieces


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _failure(handle: GenerationHandle) -> APIError | None:
    """The error to report for a request that did not end normally."""
    if handle.finish_reason == "error":
        return APIError(500, f"generation failed: {handle.error}", type="server_error", code="generation_failed")
    if handle.finish_reason == "cancelled":
        return APIError(503, "generation was cancelled (the server is shutting down)", type="server_error",
                        code="cancelled")
    return None


async def _events(request: Request, handles: list[GenerationHandle]) -> AsyncIterator[tuple[int, Any]]:
    """(index, TokenEvent) from every handle as they come; cancels them all if the client leaves."""
    q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()

    async def pump(i: int, h: GenerationHandle) -> None:
        try:
            async for ev in h:
                q.put_nowait((i, ev))
        finally:
            q.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        left = len(handles)
        while left:
            i, ev = await q.get()
            if ev is None:
                left -= 1
                continue
            if await request.is_disconnected():
                return
            yield i, ev
    finally:  # normal end, client gone (CancelledError) or is_disconnected: free the slots
        for h in handles:
            h.cancel()
        for t in tasks:
            t.cancel()


def _fingerprint(served: ServedModel) -> str:
    return f"fp_{served.version}"


# --------------------------------------------------------------------------- /v1/models


def _model_card(m: ServedModel) -> dict[str, Any]:
    return {"id": m.id, "object": "model", "created": m.created, "owned_by": "chatforge"}


@router.get("/models")
async def list_models(request: Request) -> dict[str, Any]:
    state: ServeState = request.app.state.cf
    return {"object": "list", "data": [_model_card(m) for m in state.models.values()]}


@router.get("/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict[str, Any]:
    state: ServeState = request.app.state.cf
    if model_id not in state.models:
        raise APIError(404, f"model {model_id!r} does not exist; available: {', '.join(state.models)}",
                       param="model", code="model_not_found")
    return _model_card(state.models[model_id])


# --------------------------------------------------------------------------- /v1/chat/completions


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI messages -> chatforge messages (text content only)."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("messages: must be a non-empty list of {\"role\", \"content\"} objects", param="messages")
    out = []
    for i, m in enumerate(msgs):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad_request(f"{at}: must be an object with \"role\" and \"content\"", param=at)
        role = m.get("role")
        role = "system" if role == "developer" else role
        if role not in CHAT_ROLES:
            raise bad_request(f"{at}.role: {json.dumps(role)} is not supported; allowed: "
                              f"{', '.join(CHAT_ROLES)} (and developer)", param=f"{at}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for k, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"{at}.content[{k}]: only text parts ({{\"type\": \"text\", \"text\": ...}}) "
                                      "are supported", param=f"{at}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise bad_request(f"{at}.content: must be a string or a list of text parts, got {json.dumps(content)}",
                              param=f"{at}.content")
        if role == "system" and i != 0:
            raise bad_request(f"{at}.role: a system message may only be the first message", param=f"{at}.role")
        out.append({"role": role, "content": content})
    if out[-1]["role"] == "assistant":
        raise bad_request("messages: the last message is from the assistant; end with a user message "
                          "(continuing a reply is not supported)", param="messages")
    return out


def _chat_logprobs(tok: Any, ev: Any) -> dict[str, Any]:
    def entry(tid: int, lp: float) -> dict[str, Any]:
        return {"token": tok.id_to_token(tid), "logprob": lp, "bytes": list(tok.token_bytes(tid))}

    top = [entry(t, v) for t, (_, v) in zip(ev.top_token_ids or [], ev.top_logprobs or [])]
    return {**entry(ev.token_id, ev.logprob), "top_logprobs": top}


@router.post("/chat/completions")
async def chat_completions(request: Request) -> Any:
    state: ServeState = request.app.state.cf
    body = await _body(request)
    served = _model(state, body)
    tok = served.engine.tokenizer
    messages = _messages(body)
    for name in ("tools", "functions"):
        if body.get(name):
            raise bad_request(f"{name}: tool calling is not supported", param=name)
    rf = body.get("response_format")
    if rf is not None and rf != {"type": "text"}:
        raise bad_request("response_format: only {\"type\": \"text\"} is supported", param="response_format")
    want_lp = _bool(body, "logprobs")
    top_lp = _int(body, "top_logprobs", 0, MAX_LOGPROBS)
    if top_lp is not None and not want_lp:
        raise bad_request("top_logprobs: needs logprobs: true", param="top_logprobs")
    stream = _bool(body, "stream")
    include_usage = _stream_options(body, stream)
    max_tokens = _int(body, "max_completion_tokens", 1)
    max_param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_param = _int(body, "max_tokens", 1), "max_tokens"
    params = _sampling(body, max_tokens)
    try:
        ids = render_prompt(messages, tok)
    except ChatforgeError as e:
        raise bad_request(f"messages: {e}", param="messages") from None
    params.max_tokens = _budget(served, state, len(ids), max_tokens, "messages" if max_tokens is None else max_param)
    params.logprobs = (top_lp or 0) if want_lp else None
    handle = _submit(served, ids, params, stop_token_ids(tok))
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served.id,
            "system_fingerprint": _fingerprint(served)}

    if stream:
        async def chunks() -> AsyncIterator[str]:
            def chunk(delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
                c = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
                if include_usage:
                    c["usage"] = None
                return _sse(c)

            yield chunk({"role": "assistant", "content": ""})
            async for _, ev in _events(request, [handle]):
                lp = None
                if want_lp and ev.token_id >= 0:
                    lp = {"content": [_chat_logprobs(tok, ev)]}
                if ev.text or lp:
                    yield chunk({"content": ev.text}, lp=lp)
            if not handle.done:
                return  # the client left
            request.state.tokens = handle.prompt_tokens + handle.completion_tokens
            err = _failure(handle)
            if err is not None:
                yield _sse(err.body())
            else:
                yield chunk({}, handle.finish_reason)
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(handle.prompt_tokens,
                                                                      handle.completion_tokens)})
            yield "data: [DONE]\n\n"

        return _stream_response(chunks())

    lps: list[dict[str, Any]] = []
    async for _, ev in _events(request, [handle]):
        if want_lp and ev.token_id >= 0:
            lps.append(_chat_logprobs(tok, ev))
    if not handle.done:
        return JSONResponse({}, status_code=499)  # client closed the request; nobody reads this
    err = _failure(handle)
    if err is not None:
        raise err
    request.state.tokens = handle.prompt_tokens + handle.completion_tokens
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": served.id,
        "system_fingerprint": _fingerprint(served),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": handle.text},
                     "logprobs": {"content": lps} if want_lp else None, "finish_reason": handle.finish_reason}],
        "usage": _usage(handle.prompt_tokens, handle.completion_tokens),
    }


def _stream_options(body: dict[str, Any], stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not stream:
        raise bad_request("stream_options: only allowed with stream: true", param="stream_options")
    if not isinstance(opts, dict):
        raise bad_request(f"stream_options: must be an object, got {json.dumps(opts)}", param="stream_options")
    return _bool(opts, "include_usage")


def _stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------- /v1/completions


def _prompts(body: dict[str, Any], tok: Any) -> list[tuple[str, list[int], bool]]:
    """(prompt text, ids, starts with an added BOS) per prompt; text prompts get BOS like pre-training docs."""
    p = body.get("prompt")
    vocab = tok.vocab_size

    def from_ids(ids: list[Any], at: str) -> tuple[str, list[int], bool]:
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise bad_request(f"{at}: token ids must be a non-empty list of integers in [0, {vocab})", param="prompt")
        return tok.decode(ids), list(ids), False

    if isinstance(p, str):
        return [(p, [tok.bos_id, *tok.encode(p)], True)]
    if isinstance(p, list) and p:
        if all(isinstance(x, str) for x in p):
            return [(x, [tok.bos_id, *tok.encode(x)], True) for x in p]
        if all(isinstance(x, int) and not isinstance(x, bool) for x in p):
            return [from_ids(p, "prompt")]
        if all(isinstance(x, list) for x in p):
            return [from_ids(x, f"prompt[{i}]") for i, x in enumerate(p)]
    raise bad_request("prompt: must be a string, a non-empty list of strings, a list of token ids or a list of "
                      "token id lists", param="prompt")


class _Offsets:
    """Character offsets of successive tokens in the text they decode to (for ``text_offset``)."""

    def __init__(self, start: int = 0) -> None:
        self.pos = start
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def next(self, data: bytes) -> int:
        at = self.pos
        self.pos += len(self._dec.decode(data))
        return at


def _legacy_logprobs(tok: Any, ids: list[int], lps: list[float | None], tops: list[Any],
                     offsets: _Offsets) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for tid, lp, top in zip(ids, lps, tops):
        out["tokens"].append(tok.id_to_token(tid))
        out["token_logprobs"].append(lp)
        out["top_logprobs"].append(None if top is None else {tok.id_to_token(i): v for i, v in top})
        out["text_offset"].append(offsets.next(tok.token_bytes(tid)))
    return out


@router.post("/completions")
async def completions(request: Request) -> Any:
    state: ServeState = request.app.state.cf
    body = await _body(request)
    served = _model(state, body)
    engine, tok = served.engine, served.engine.tokenizer
    prompts = _prompts(body, tok)
    _unsupported(body, "best_of", (1,), "only best_of=1 is supported")
    _unsupported(body, "suffix", ("",), "suffix (insertion) is not supported")
    echo = _bool(body, "echo")
    n_lp = _int(body, "logprobs", 0, MAX_LOGPROBS)
    stream = _bool(body, "stream")
    include_usage = _stream_options(body, stream)
    max_tokens = _int(body, "max_tokens", 0, default=DEFAULT_COMPLETION_TOKENS)
    base = _sampling(body, max_tokens)
    budgets = [_budget(served, state, len(ids), max_tokens, "prompt") for _, ids, _ in prompts]

    # Prompt logprobs (echo + logprobs, as lm-evaluation-harness asks): one forward per prompt.
    prompt_lp: list[dict[str, list[Any]] | None] = [None] * len(prompts)
    if echo and n_lp is not None:
        for k, (_, ids, bos) in enumerate(prompts):
            lps, tops = await run_in_threadpool(engine.score_prompt, ids, n_lp)
            skip = 1 if bos else 0  # the added BOS is not part of the prompt text
            prompt_lp[k] = _legacy_logprobs(tok, ids[skip:], lps[skip:], tops[skip:], _Offsets())

    handles: list[GenerationHandle | None] = []
    try:
        for (_, ids, _), budget in zip(prompts, budgets):
            if budget == 0:
                handles.append(None)  # nothing to generate (max_tokens 0: scoring only)
                continue
            params = SamplingParams(**{**base.__dict__, "max_tokens": budget, "logprobs": n_lp})
            handles.append(_submit(served, ids, params, stop_token_ids(tok)))  # a special token ends the text
    except APIError:
        for h in handles:
            if h is not None:
                h.cancel()
        raise
    live = [h for h in handles if h is not None]
    index = {id(h): k for k, h in enumerate(handles) if h is not None}
    n_prompt = sum(len(ids) for _, ids, _ in prompts)
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": served.id,
            "system_fingerprint": _fingerprint(served)}
    offsets = [_Offsets(len(text)) for text, _, _ in prompts]  # completion offsets follow the prompt text

    def token_lp(k: int, ev: Any) -> dict[str, list[Any]]:
        return _legacy_logprobs(tok, [ev.token_id], [ev.logprob],
                                [list(zip(ev.top_token_ids or [], [v for _, v in ev.top_logprobs or []]))],
                                offsets[k])

    def finish_reason(k: int) -> str:
        h = handles[k]
        return "length" if h is None else str(h.finish_reason)

    def completion_tokens() -> int:
        return sum(h.completion_tokens for h in live)

    if stream:
        async def chunks() -> AsyncIterator[str]:
            def chunk(k: int, text: str, lp: Any = None, finish: str | None = None) -> str:
                c = {**head, "choices": [{"index": k, "text": text, "logprobs": lp, "finish_reason": finish}]}
                if include_usage:
                    c["usage"] = None
                return _sse(c)

            if echo:
                for k, (text, _, _) in enumerate(prompts):
                    yield chunk(k, text, prompt_lp[k])
            async for j, ev in _events(request, live):
                k = index[id(live[j])]
                lp = token_lp(k, ev) if n_lp is not None and ev.token_id >= 0 else None
                if ev.text or lp:
                    yield chunk(k, ev.text, lp)
            if not all(h.done for h in live):
                return  # the client left
            request.state.tokens = n_prompt + completion_tokens()
            errs = [e for h in live if (e := _failure(h)) is not None]
            if errs:
                yield _sse(errs[0].body())
            else:
                for k in range(len(prompts)):
                    yield chunk(k, "", None, finish_reason(k))
                if include_usage:
                    yield _sse({**head, "choices": [], "usage": _usage(n_prompt, completion_tokens())})
            yield "data: [DONE]\n\n"

        return _stream_response(chunks())

    gen_lp: list[dict[str, list[Any]]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                           "text_offset": []} for _ in prompts]
    async for j, ev in _events(request, live):
        k = index[id(live[j])]
        if n_lp is not None and ev.token_id >= 0:
            for key, vals in token_lp(k, ev).items():
                gen_lp[k][key].extend(vals)
    if not all(h.done for h in live):
        return JSONResponse({}, status_code=499)  # client closed the request; nobody reads this
    for h in live:
        if (err := _failure(h)) is not None:
            raise err
    request.state.tokens = n_prompt + completion_tokens()
    choices = []
    for k, (text, _, _) in enumerate(prompts):
        h = handles[k]
        out = (text if echo else "") + (h.text if h is not None else "")
        lp = None
        if n_lp is not None:
            lp = gen_lp[k]
            if prompt_lp[k] is not None:
                lp = {key: prompt_lp[k][key] + gen_lp[k][key] for key in gen_lp[k]}
        choices.append({"index": k, "text": out, "logprobs": lp, "finish_reason": finish_reason(k)})
    return {**head, "choices": choices, "usage": _usage(n_prompt, completion_tokens())}
