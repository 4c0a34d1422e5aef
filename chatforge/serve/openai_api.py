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
feedback store; a wrong key is counted against its client address before it is
looked up, with back-off (``FailureThrottle``); then a request bucket per key, or
per client address without one.

Limits per request: bodies must be ``application/json`` and nest at most
``MAX_JSON_DEPTH`` levels (``fields``); at most ``max_prompts_per_request`` prompts;
the request's worst case in tokens (prompt + max_tokens for each prompt) is taken
from the client's token bucket before it runs and what it did not use is given back
after; and at most ``inflight_per_request`` of its prompts are in the engine at once
(the rest wait here), so one request cannot take every slot and queue place.

Extensions beyond OpenAI (as in vLLM): ``top_k`` and ``repetition_penalty``.

Safety (``state.guard``, ``chatforge serve --guard POLICY``; see ``guard``): a chat prompt the
policy refuses is answered with the refusal and ``finish_reason`` ``"content_filter"``
without generating; a redacted one reaches the model redacted; answers stream through the
guard's hold-back filter, which cuts an answer that turns unsafe before the unsafe text is
sent. ``/v1/completions`` is guarded the same way, each prompt's text checked as a prompt.
A guarded server refuses ``logprobs`` (they would show the withheld text). Flagged exchanges
go to the store's review queue.

Completions' logprobs list the stop token that ended a reply (as vLLM lists EOS; its text
is not added): a scorer such as lm-eval's ``local-completions`` sends ``echo`` with
``max_tokens: 1`` and drops the last entry as the generated token, so without it a
reply that stops at once would cost the prompt its last token's logprob.
"""

from __future__ import annotations

import asyncio
import codecs
import hashlib
import hmac
import json
import math
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from chatforge.chat.template import render_prompt, stop_token_ids
from chatforge.errors import ChatforgeError
from chatforge.io import dumps_line
from chatforge.serve.engine import MAX_LOGPROBS, GenerationHandle, PromptTooLong, QueueFull, SamplingParams
from chatforge.serve.fields import FieldError, get_bool, get_float, get_int, read_object
from chatforge.serve.guard import (
    CONTENT_FILTER,
    AnswerFilter,
    PromptDecision,
    flag_rows,
    record_flags,
    record_flags_later,
)
from chatforge.serve.state import APIError, ServedModel, ServeState, client_address

CHAT_ROLES = ("system", "user", "assistant")
MAX_STOP = 16  # OpenAI allows 4; a few more cost nothing
DEFAULT_COMPLETION_TOKENS = 16  # the legacy completions default
KEY_CACHE_S = 60.0  # a store key found valid is believed this long without another lookup
ENGINE_FULL_TIMEOUT_S = 60.0  # a request's later prompts wait this long for room in a full engine
DISCONNECT_CHECK_S = 0.1  # how often a streaming request asks whether its client is still there


# --------------------------------------------------------------------------- errors


async def api_error_handler(request: Request, exc: Exception) -> JSONResponse:
    """Registered on the app for ``APIError`` (see ``create_app``)."""
    assert isinstance(exc, APIError)
    return exc.response()


def field_error(exc: FieldError) -> APIError:
    """A request-field error in OpenAI's shape (400, or 415 for a body that is not JSON)."""
    return APIError(415 if exc.status == 415 else 400, exc.message, param=exc.field)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- guard: keys and rate limit


def key_fingerprint(key: str) -> str:
    """A loggable name for a key: never the key itself."""
    return "key:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:10]


def _bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        return auth[7:].strip() or None
    return request.headers.get("api-key") or None  # Azure-style clients


def _too_many_wrong_keys(wait: float) -> APIError:
    retry = max(1, math.ceil(wait))
    return APIError(429, f"too many wrong API keys from this address; retry in {retry} s", type="rate_limit_error",
                    code="rate_limit_exceeded", headers={"Retry-After": str(retry)})


async def identify(state: ServeState, key: str, address: str) -> str | None:
    """The id of a valid key ("key:<hash>" or "user:<name>"), or None.

    The server's own keys are compared in constant time with no lookup. Any other key is
    counted as a failed attempt of ``address`` *before* it is looked up in the store (one
    lookup at a time, so parallel guesses are counted one by one), and an address backing
    off gets no lookup: 429 when the API needs a key, else it goes on without one (OpenAI
    clients always send some key, e.g. "EMPTY", to a server that needs none). A store key
    found valid is remembered for ``KEY_CACHE_S`` seconds (by its hash), so a client sending
    many requests with it costs no lookups and never meets the back-off."""
    given = key.encode("utf-8")
    match = False
    for k in state.settings.api_keys:  # compare with every key: the time does not tell which one matched
        match |= hmac.compare_digest(given, k.encode("utf-8"))
    if match:
        return key_fingerprint(key)
    digest = hashlib.sha256(given).hexdigest()
    throttle_key, required = f"ip:{address}", bool(state.settings.api_keys)
    if state.store is None:  # nothing to look up; with keys required, a guess at them all the same
        wait = state.key_throttle.attempt(throttle_key) if required else 0.0
        if wait:
            raise _too_many_wrong_keys(wait)
        return None
    known = state.known_keys.get(digest)
    if known is not None and known[1] > time.monotonic():
        return known[0]
    async with state.key_lookup():
        known = state.known_keys.get(digest)  # a parallel request may have just looked it up
        if known is not None and known[1] > time.monotonic():
            return known[0]
        wait = state.key_throttle.attempt(throttle_key)
        if wait:
            if required:
                raise _too_many_wrong_keys(wait)
            return None  # the API needs no key: go on without one, and without a lookup
        from chatforge.store import service

        user = await run_in_threadpool(service.user_for_api_key, state.store, key)
        if not user:
            return None
        state.key_throttle.release(throttle_key)  # this attempt was no failure (earlier ones stay)
        ident = f"user:{user['username']}"
        if len(state.known_keys) > 10_000:
            now = time.monotonic()
            state.known_keys = {d: v for d, v in state.known_keys.items() if v[1] > now}
        state.known_keys[digest] = (ident, time.monotonic() + KEY_CACHE_S)
        return ident


async def guard(request: Request) -> None:
    """Authenticate (when keys are configured) and rate-limit every /v1 request."""
    state: ServeState = request.app.state.cf
    address = client_address(request)
    key = _bearer(request)
    ident = await identify(state, key, address) if key else None
    if state.settings.api_keys and ident is None:
        msg = ("missing API key: send it as 'Authorization: Bearer KEY'" if key is None else
               "invalid API key")
        raise APIError(401, msg, param=None, code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    request.state.key_id = ident
    request.state.limit_id = ident or f"ip:{address}"
    wait = state.limiter.check(request.state.limit_id)
    if wait > 0:
        retry = max(1, math.ceil(wait))
        raise APIError(429, f"rate limit of {state.settings.rate_limit_per_minute} requests per minute reached; "
                       f"retry in {retry} s", type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(retry)})


class _TokenCharge:
    """The tokens a request took from its client's token bucket; ``settle`` gives back the unused part."""

    def __init__(self, request: Request, state: ServeState, cost: int) -> None:
        self.state, self.ident, self.cost = state, request.state.limit_id, cost
        limit = state.token_limiter.per_minute
        wait = state.token_limiter.check(self.ident, cost)
        if wait == math.inf:
            raise APIError(429, f"this request may use {cost} tokens (prompt + max_tokens for each prompt), more "
                           f"than the limit of {limit} tokens per minute; lower max_tokens or send fewer prompts",
                           type="tokens", code="rate_limit_exceeded")
        if wait > 0:
            retry = max(1, math.ceil(wait))
            raise APIError(429, f"rate limit of {limit} tokens per minute reached (this request may use {cost}); "
                           f"retry in {retry} s", type="tokens", code="rate_limit_exceeded",
                           headers={"Retry-After": str(retry)})
        self.settled = False

    def settle(self, used: int) -> None:
        if not self.settled:
            self.settled = True
            self.state.token_limiter.refund(self.ident, self.cost - used)


router = APIRouter(prefix="/v1", dependencies=[Depends(guard)])


# --------------------------------------------------------------------------- request fields


async def _body(request: Request) -> dict[str, Any]:
    """The JSON object body (``application/json`` only, nesting limited): see ``fields.read_object``."""
    return await read_object(request)


def _unsupported(body: dict[str, Any], name: str, allowed: tuple[Any, ...], what: str) -> None:
    v = body.get(name)
    if v is not None and v not in allowed:
        raise bad_request(f"{name}: {what} (got {json.dumps(v)})", param=name)


def _sampling(body: dict[str, Any], max_tokens: int | None) -> SamplingParams:
    """The sampling fields both endpoints share; ``max_tokens`` is resolved by the caller."""
    _unsupported(body, "n", (1,), "only n=1 is supported; send several requests for several answers")
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
        top_k = get_int(body, "top_k", required=False, lo=1)
    top_p = get_float(body, "top_p", lo=0.0, hi=1.0, lo_open=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request(f"seed: must be an integer, got {json.dumps(seed)}", param="seed")
    return SamplingParams(
        max_tokens=max_tokens if max_tokens is not None else 0,
        temperature=get_float(body, "temperature", lo=0.0, hi=2.0, default=1.0),
        top_p=None if top_p == 1.0 else top_p,
        top_k=top_k,
        repetition_penalty=get_float(body, "repetition_penalty", lo=0.0, hi=10.0, default=1.0, lo_open=True),
        frequency_penalty=get_float(body, "frequency_penalty", lo=-2.0, hi=2.0, default=0.0),
        presence_penalty=get_float(body, "presence_penalty", lo=-2.0, hi=2.0, default=0.0),
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
    return f"data: {dumps_line(obj)}\n\n"


_MARK = "\ue000chatforge-text\ue000"  # a private-use placeholder no generated text is compared against


def _text_chunk_template(rendered: str) -> Callable[[str], str]:
    """``rendered``: a whole SSE chunk whose only varying field is the text ``_MARK``. Returns a function of the
    text giving the same string as rendering the chunk again with that text (``_sse`` of the same dict),
    without rebuilding and re-serialising the dict at every token."""
    pre, post = rendered.split(dumps_line(_MARK))
    return lambda text: pre + dumps_line(text) + post


def _failure(handle: GenerationHandle) -> APIError | None:
    """The error to report for a request that did not end normally."""
    if handle.finish_reason == "error":
        return APIError(500, f"generation failed: {handle.error}", type="server_error", code="generation_failed")
    if handle.finish_reason == "cancelled":
        return APIError(503, "generation was cancelled (the server is shutting down)", type="server_error",
                        code="cancelled")
    return None


class _ClientLeft:
    """``await left()``: whether a streaming request's client has gone. Asking the server costs more than a
    token, so it asks at most every ``DISCONNECT_CHECK_S`` (a departed client frees its slot within that, not
    at every token) and answers False in between."""

    def __init__(self, request: Request) -> None:
        self.request, self.checked_at = request, float("-inf")

    async def __call__(self) -> bool:
        now = time.monotonic()
        if now - self.checked_at < DISCONNECT_CHECK_S:
            return False
        self.checked_at = now
        return await self.request.is_disconnected()


class _Batch:
    """The prompts of one request, at most ``window`` of them in the engine at once (fair admission).

    The rest wait here, not in the engine's queue, and go in as the request's own prompts
    finish, so one request holds at most ``window`` slots or queue places and other clients
    keep getting theirs. ``start`` submits the first wave and raises (503 when not even one
    prompt fits); a later prompt that meets a full engine waits for room, at most
    ``ENGINE_FULL_TIMEOUT_S``, then ``error`` is set. ``None`` jobs generate nothing."""

    def __init__(self, served: ServedModel, jobs: list[tuple[list[int], SamplingParams] | None],
                 window: int) -> None:
        self.served, self.jobs, self.window = served, jobs, max(1, window)
        self.handles: list[GenerationHandle | None] = [None] * len(jobs)
        self.pending = deque(k for k, job in enumerate(jobs) if job is not None)
        self.stops = stop_token_ids(served.engine.tokenizer)  # a special token ends the text
        self.error: APIError | None = None

    def _submit_next(self) -> int:
        k = self.pending[0]
        ids, params = self.jobs[k]  # type: ignore[misc]
        self.handles[k] = _submit(self.served, ids, params, self.stops)
        self.pending.popleft()
        return k

    def start(self) -> None:
        """Submit the first wave; raises the APIError when no prompt could go in (nothing is left running)."""
        submitted = 0
        while self.pending and submitted < self.window:
            try:
                self._submit_next()
            except APIError as e:
                if e.status == 503 and submitted:
                    return  # the rest wait for this request's own prompts to finish
                self.cancel()
                raise
            submitted += 1

    def cancel(self) -> None:
        for h in self.handles:
            if h is not None:
                h.cancel()

    @property
    def done(self) -> bool:
        return self.error is None and not self.pending and all(h.done for h in self.handles if h is not None)

    def live(self) -> list[GenerationHandle]:
        return [h for h in self.handles if h is not None]

    async def events(self, request: Request) -> AsyncIterator[tuple[int, Any]]:
        """(prompt index, TokenEvent) as they come; cancels everything if the client leaves."""
        if len(self.handles) == 1 and self.handles[0] is not None and not self.pending:
            # One prompt (every chat completion): read its handle directly. The general path below hands
            # each token through a helper task and a second queue, an extra event-loop wake-up per token
            # that costs the loop about as much as the rest of streaming it, with 16 streams at once.
            handle, left = self.handles[0], _ClientLeft(request)
            try:
                async for ev in handle:
                    if await left():
                        return
                    yield 0, ev
            finally:
                self.cancel()
            return
        q: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        tasks: list[asyncio.Task] = []

        async def pump(k: int, h: GenerationHandle) -> None:
            try:
                async for ev in h:
                    q.put_nowait((k, ev))
            finally:
                q.put_nowait((k, None))

        def launch(k: int) -> None:
            tasks.append(asyncio.create_task(pump(k, self.handles[k])))  # type: ignore[arg-type]

        for k, h in enumerate(self.handles):
            if h is not None:
                launch(k)
        running, full_since = len(tasks), None
        left = _ClientLeft(request)
        try:
            while running or self.pending:
                if self.pending and running < self.window:
                    try:
                        launch(self._submit_next())
                        running, full_since = running + 1, None
                        continue
                    except APIError as e:
                        if e.status != 503:
                            self.error = e
                            return
                        if not running:  # nothing of ours will free a place: wait for other requests'
                            full_since = full_since or time.monotonic()
                            if time.monotonic() - full_since > ENGINE_FULL_TIMEOUT_S:
                                self.error = e
                                return
                            await asyncio.sleep(0.05)
                            continue
                k, ev = await q.get()
                if ev is None:
                    running -= 1
                    continue
                if await left():
                    return
                yield k, ev
        finally:  # normal end, client gone (CancelledError) or is_disconnected: free the slots
            self.cancel()
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


def _no_logprobs_when_guarded(state: ServeState, asked: bool, param: str) -> None:
    if asked and state.guard is not None:
        raise bad_request(f"{param}: not available while this server's safety guard is on (token logprobs would "
                          "show text the guard holds back); score with a server started with --no-guard",
                          param=param)


def _ident(request: Request) -> str | None:
    return getattr(request.state, "key_id", None) or getattr(request.state, "limit_id", None)


def _flags(state: ServeState, request: Request, served: ServedModel, messages: list[dict[str, Any]],
           prompt: PromptDecision | None, answer: AnswerFilter | None, delivered: str | None = None
           ) -> list[dict[str, Any]]:
    if state.guard is None:
        return []
    return flag_rows(state.guard, messages, prompt.verdict if prompt is not None else None, answer, source="api",
                     delivered=delivered, model_id=served.id, model_version=served.version, ident=_ident(request))


async def _refused_chat(request: Request, state: ServeState, served: ServedModel, messages: list[dict[str, Any]],
                        decision: PromptDecision, stream: bool, include_usage: bool) -> Any:
    """The answer to a prompt the guard refuses: the policy's refusal, nothing generated."""
    assert state.guard is not None
    refusal = state.guard.refusal
    try:
        n_prompt = len(render_prompt(messages, served.engine.tokenizer))
    except ChatforgeError:
        n_prompt = 0
    request.state.tokens = n_prompt
    await record_flags(state.store, _flags(state, request, served, messages, decision, None, refusal))
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "created": created, "model": served.id, "system_fingerprint": _fingerprint(served)}
    if not stream:
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": refusal}, "logprobs": None,
                             "finish_reason": CONTENT_FILTER}],
                "usage": _usage(n_prompt, 0)}

    async def chunks() -> AsyncIterator[str]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            c = {**head, "object": "chat.completion.chunk",
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
            if include_usage:
                c["usage"] = None
            return _sse(c)

        yield chunk({"role": "assistant", "content": ""})
        yield chunk({"content": refusal})
        yield chunk({}, CONTENT_FILTER)
        if include_usage:
            yield _sse({**head, "object": "chat.completion.chunk", "choices": [], "usage": _usage(n_prompt, 0)})
        yield "data: [DONE]\n\n"

    return _stream_response(chunks())


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
    want_lp = get_bool(body, "logprobs")
    top_lp = get_int(body, "top_logprobs", required=False, lo=0, hi=MAX_LOGPROBS)
    if top_lp is not None and not want_lp:
        raise bad_request("top_logprobs: needs logprobs: true", param="top_logprobs")
    _no_logprobs_when_guarded(state, want_lp, "logprobs")
    stream = get_bool(body, "stream")
    include_usage = _stream_options(body, stream)
    max_tokens = get_int(body, "max_completion_tokens", required=False, lo=1)
    max_param = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, max_param = get_int(body, "max_tokens", required=False, lo=1), "max_tokens"
    params = _sampling(body, max_tokens)
    guard = state.guard
    decision = guard.guard_prompt(messages) if guard is not None else None
    if decision is not None and decision.refused:
        return await _refused_chat(request, state, served, messages, decision, stream, include_usage)
    try:
        ids = render_prompt(decision.messages if decision is not None else messages, tok)
    except ChatforgeError as e:
        raise bad_request(f"messages: {e}", param="messages") from None
    params.max_tokens = _budget(served, state, len(ids), max_tokens, "messages" if max_tokens is None else max_param)
    params.logprobs = (top_lp or 0) if want_lp else None
    charge = _TokenCharge(request, state, len(ids) + params.max_tokens)
    batch = _Batch(served, [(ids, params)], 1)
    try:
        batch.start()
    except APIError:
        charge.settle(0)
        raise
    handle = batch.handles[0]
    assert handle is not None
    filt = guard.answer_filter(messages) if guard is not None else None  # context: the conversation as sent
    cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": served.id,
            "system_fingerprint": _fingerprint(served)}

    def flags() -> list[dict[str, Any]]:
        return _flags(state, request, served, messages, decision, filt)

    if stream:
        async def chunks() -> AsyncIterator[str]:
            def chunk(delta: dict[str, Any], finish: str | None = None, lp: Any = None) -> str:
                c = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}]}
                if include_usage:
                    c["usage"] = None
                return _sse(c)

            content_chunk = _text_chunk_template(chunk({"content": _MARK}))

            ended = False
            try:
                yield chunk({"role": "assistant", "content": ""})
                async with aclosing(batch.events(request)) as events:
                    async for _, ev in events:
                        lp = None
                        if want_lp and ev.token_id >= 0:
                            lp = {"content": [_chat_logprobs(tok, ev)]}
                        text = ev.text if filt is None else filt.push(ev.text)
                        if lp:
                            yield chunk({"content": text}, lp=lp)
                        elif text:
                            yield content_chunk(text)
                        if filt is not None and filt.refused:
                            batch.cancel()  # the guard cut the answer: stop generating it
                            break
                refused = filt is not None and filt.refused
                if not handle.done and not refused:
                    return  # the client left
                request.state.tokens = handle.prompt_tokens + handle.completion_tokens
                err = None if refused else _failure(handle)
                if err is not None:
                    yield _sse(err.body())
                else:
                    if filt is not None and (tail := filt.finish()):
                        yield chunk({"content": tail})
                    yield chunk({}, filt.finish_reason(handle.finish_reason) if filt else handle.finish_reason)
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(handle.prompt_tokens,
                                                                          handle.completion_tokens)})
                ended = True
                await record_flags(state.store, flags())
                yield "data: [DONE]\n\n"
            finally:
                charge.settle(handle.prompt_tokens + handle.completion_tokens)
                if not ended and filt is not None:  # the client left: still record what was generated
                    filt.finish()
                    record_flags_later(state.store, flags())

        return _stream_response(chunks())

    lps: list[dict[str, Any]] = []
    try:
        async with aclosing(batch.events(request)) as events:
            async for _, ev in events:
                if want_lp and ev.token_id >= 0:
                    lps.append(_chat_logprobs(tok, ev))
                if filt is not None:
                    filt.push(ev.text)
                    if filt.refused:
                        batch.cancel()  # the guard cut the answer: stop generating it
                        break
    finally:
        charge.settle(handle.prompt_tokens + handle.completion_tokens)
    refused = filt is not None and filt.refused
    if not handle.done and not refused:
        return JSONResponse({}, status_code=499)  # client closed the request; nobody reads this
    err = None if refused else _failure(handle)
    if err is not None:
        raise err
    request.state.tokens = handle.prompt_tokens + handle.completion_tokens
    content, finish = handle.text, handle.finish_reason
    if filt is not None:
        filt.finish()
        content, finish = filt.delivered, filt.finish_reason(handle.finish_reason)
        await record_flags(state.store, flags())
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": served.id,
        "system_fingerprint": _fingerprint(served),
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                     "logprobs": {"content": lps} if want_lp else None, "finish_reason": finish}],
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
    return get_bool(opts, "include_usage")


def _stream_response(gen: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(gen, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --------------------------------------------------------------------------- /v1/completions


def _prompts(body: dict[str, Any], tok: Any, max_prompts: int) -> list[tuple[str, list[int], bool]]:
    """(prompt text, ids, starts with an added BOS) per prompt; text prompts get BOS like pre-training docs."""
    p = body.get("prompt")
    vocab = tok.vocab_size
    if isinstance(p, list) and p and not all(isinstance(x, int) for x in p) and len(p) > max_prompts:
        raise bad_request(f"prompt: at most {max_prompts} prompts per request, got {len(p)}; send several requests",
                          param="prompt", code="too_many_prompts")

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
    prompts = _prompts(body, tok, state.settings.max_prompts_per_request)
    _unsupported(body, "best_of", (1,), "only best_of=1 is supported")
    _unsupported(body, "suffix", ("",), "suffix (insertion) is not supported")
    echo = get_bool(body, "echo")
    n_lp = get_int(body, "logprobs", required=False, lo=0, hi=MAX_LOGPROBS)
    _no_logprobs_when_guarded(state, n_lp is not None, "logprobs")
    stream = get_bool(body, "stream")
    include_usage = _stream_options(body, stream)
    max_tokens = get_int(body, "max_tokens", required=False, lo=0, default=DEFAULT_COMPLETION_TOKENS)
    base = _sampling(body, max_tokens)
    guard = state.guard
    # The guard reads each prompt's text as a prompt (and as the context of its completion). Refused:
    # nothing is generated, the completion is the refusal; redacted: the model sees the redacted text.
    prompt_verdicts: list[Any] = [None] * len(prompts)
    refused = [False] * len(prompts)
    if guard is not None:
        for k, (text, _, bos) in enumerate(prompts):
            prompt_verdicts[k], shown = guard.guard_text(text)
            refused[k] = prompt_verdicts[k].action == "refuse"
            if shown != text:
                prompts[k] = (text, [tok.bos_id] * bos + tok.encode(shown), bos)
    budgets = [_budget(served, state, len(ids), max_tokens, "prompt") for _, ids, _ in prompts]
    n_prompt = sum(len(ids) for _, ids, _ in prompts)
    charge = _TokenCharge(request, state, n_prompt + sum(budgets))
    jobs = [None if budget == 0 or refused[k] else  # nothing to generate (max_tokens 0: scoring only)
            (ids, SamplingParams(**{**base.__dict__, "max_tokens": budget, "logprobs": n_lp}))
            for k, ((_, ids, _), budget) in enumerate(zip(prompts, budgets))]
    filters: list[AnswerFilter | None] = [
        guard.answer_filter(context=text) if guard is not None and job is not None else None
        for (text, _, _), job in zip(prompts, jobs)]
    batch = _Batch(served, jobs, state.settings.inflight_per_request)
    try:
        # Prompt logprobs (echo + logprobs, as lm-evaluation-harness asks): one forward per prompt.
        prompt_lp: list[dict[str, list[Any]] | None] = [None] * len(prompts)
        if echo and n_lp is not None:
            for k, (_, ids, bos) in enumerate(prompts):
                lps, tops = await run_in_threadpool(engine.score_prompt, ids, n_lp)
                skip = 1 if bos else 0  # the added BOS is not part of the prompt text
                prompt_lp[k] = _legacy_logprobs(tok, ids[skip:], lps[skip:], tops[skip:], _Offsets())
        batch.start()
    except BaseException:
        charge.settle(0)
        raise
    cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    head = {"id": cid, "object": "text_completion", "created": created, "model": served.id,
            "system_fingerprint": _fingerprint(served)}
    offsets = [_Offsets(len(text)) for text, _, _ in prompts]  # completion offsets follow the prompt text

    def token_lp(k: int, ev: Any) -> dict[str, list[Any]]:
        return _legacy_logprobs(tok, [ev.token_id], [ev.logprob],
                                [list(zip(ev.top_token_ids or [], [v for _, v in ev.top_logprobs or []]))],
                                offsets[k])

    def cut(k: int) -> bool:
        """The guard refused prompt ``k`` or cut its completion."""
        f = filters[k]
        return refused[k] or (f is not None and f.refused)

    def finish_reason(k: int) -> str:
        h = batch.handles[k]
        if cut(k):
            return CONTENT_FILTER
        return "length" if h is None else str(h.finish_reason)

    def guarded_text(k: int) -> str:
        """Completion ``k`` as the client gets it."""
        if refused[k]:
            return guard.refusal if guard is not None else ""
        f, h = filters[k], batch.handles[k]
        if f is not None:
            return f.delivered
        return h.text if h is not None else ""

    def flags() -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = []
        if guard is not None:
            for k, (text, _, _) in enumerate(prompts):
                rows += flag_rows(guard, [{"role": "user", "content": text}], prompt_verdicts[k], filters[k],
                                  source="api", delivered=guard.refusal if refused[k] else None, model_id=served.id,
                                  model_version=served.version, ident=_ident(request))
        return rows

    def completion_tokens() -> int:
        return sum(h.completion_tokens for h in batch.live())

    def stop_lps() -> list[tuple[int, dict[str, list[Any]]]]:
        """The logprobs of the stop token that ended each reply (listed, as vLLM lists EOS)."""
        return [(k, token_lp(k, h.stop_event)) for k, h in enumerate(batch.handles)
                if h is not None and h.stop_event is not None]

    def failure() -> APIError | None:
        return batch.error or next((e for k, h in enumerate(batch.handles)
                                    if h is not None and not cut(k) and (e := _failure(h)) is not None), None)

    def push(k: int, text: str) -> str:
        """A delta of completion ``k`` through its guard filter; a cut completion stops generating."""
        f = filters[k]
        if f is None:
            return text
        was_refused = f.refused
        out = f.push(text)
        if f.refused and not was_refused:
            h = batch.handles[k]
            if h is not None:
                h.cancel()
        return out

    if stream:
        async def chunks() -> AsyncIterator[str]:
            def chunk(k: int, text: str, lp: Any = None, finish: str | None = None) -> str:
                c = {**head, "choices": [{"index": k, "text": text, "logprobs": lp, "finish_reason": finish}]}
                if include_usage:
                    c["usage"] = None
                return _sse(c)

            ended = False
            try:
                if echo:
                    for k, (text, _, _) in enumerate(prompts):
                        yield chunk(k, text, prompt_lp[k])
                for k in range(len(prompts)):
                    if refused[k] and guard is not None:
                        yield chunk(k, guard.refusal)
                async with aclosing(batch.events(request)) as events:
                    async for k, ev in events:
                        lp = token_lp(k, ev) if n_lp is not None and ev.token_id >= 0 else None
                        text = push(k, ev.text)
                        if text or lp:
                            yield chunk(k, text, lp)
                if batch.error is None and not batch.done:
                    return  # the client left
                request.state.tokens = n_prompt + completion_tokens()
                err = failure()
                if err is not None:
                    yield _sse(err.body())
                else:
                    for k, f in enumerate(filters):
                        if f is not None and (tail := f.finish()):
                            yield chunk(k, tail)
                    if n_lp is not None:
                        for k, lp in stop_lps():
                            yield chunk(k, "", lp)
                    for k in range(len(prompts)):
                        yield chunk(k, "", None, finish_reason(k))
                    if include_usage:
                        yield _sse({**head, "choices": [], "usage": _usage(n_prompt, completion_tokens())})
                ended = True
                await record_flags(state.store, flags())
                yield "data: [DONE]\n\n"
            finally:
                charge.settle(n_prompt + completion_tokens())
                if not ended and guard is not None:  # the client left: still record what was generated
                    for f in filters:
                        if f is not None:
                            f.finish()
                    record_flags_later(state.store, flags())

        return _stream_response(chunks())

    gen_lp: list[dict[str, list[Any]]] = [{"tokens": [], "token_logprobs": [], "top_logprobs": [],
                                           "text_offset": []} for _ in prompts]
    try:
        async with aclosing(batch.events(request)) as events:
            async for k, ev in events:
                if n_lp is not None and ev.token_id >= 0:
                    for key, vals in token_lp(k, ev).items():
                        gen_lp[k][key].extend(vals)
                push(k, ev.text)
    finally:
        charge.settle(n_prompt + completion_tokens())
    if batch.error is None and not batch.done:
        return JSONResponse({}, status_code=499)  # client closed the request; nobody reads this
    if (err := failure()) is not None:
        raise err
    request.state.tokens = n_prompt + completion_tokens()
    if n_lp is not None:
        for k, key_vals in stop_lps():
            for key, vals in key_vals.items():
                gen_lp[k][key].extend(vals)
    for f in filters:
        if f is not None:
            f.finish()
    await record_flags(state.store, flags())
    choices = []
    for k, (text, _, _) in enumerate(prompts):
        out = (text if echo else "") + guarded_text(k)
        lp = None
        if n_lp is not None:
            lp = gen_lp[k]
            if prompt_lp[k] is not None:
                lp = {key: prompt_lp[k][key] + gen_lp[k][key] for key in gen_lp[k]}
        choices.append({"index": k, "text": out, "logprobs": lp, "finish_reason": finish_reason(k)})
    return {**head, "choices": choices, "usage": _usage(n_prompt, completion_tokens())}
