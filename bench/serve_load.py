"""Serving under load: what continuous batching buys when many clients stream at once,
that chat feedback is neither lost nor stuck when they do, that nothing acknowledged is lost
when the server is killed, and how the limits refuse work.

    python bench/serve_load.py                                   # runs/default/finetune/sft/model, 60 s per phase
    python bench/serve_load.py runs/x/finetune/sft/model --duration 5 --device cpu
    python bench/serve_load.py MODEL --db postgresql+psycopg://user:pass@127.0.0.1/bench   # the same on PostgreSQL

Starts ``chatforge serve MODEL --db URL`` (``python -m chatforge.serve.cli``, rate limit off) on a
free loopback port. ``--db`` is any SQLAlchemy URL the bench may write to (it adds users named
``bench-*-RUNID``; default: a SQLite file in a temp directory); the bench itself opens the same
database through ``chatforge.store`` to create its admin and the fault phase's data, and counts
every stored row through the store, never around it. Then five phases of ``--duration`` seconds:

1. one client sending streaming chat requests to /v1/chat/completions back to back;
2. ``--clients`` (16) clients doing the same concurrently (httpx, asyncio);
3. feedback under load: the admin creates ``--clients`` reviewer users (POST
   /api/admin/users); each logs in (POST /api/login, cookie session), opens a
   conversation (POST /api/conversations, with the request's system prompt) and loops:
   send a message (POST /api/conversations/{id}/messages, ``max_tokens`` 64), read the
   SSE stream to its ``{"done": true, "message_id": ...}`` event, then thumb the answer
   up or down with a comment (POST /api/messages/{id}/feedback). A conversation gets
   ``--turns`` (3) messages, or fewer when the server says it no longer fits the
   context, then the client starts a new one;
4. the fault phase: ``--clients`` more reviewers (made through the store, each with a
   session and a conversation of ``--fault-messages`` stored answers) post feedback on
   their answers as fast as the server takes it, one answer after another, retrying an
   answer until a post of it is acknowledged (HTTP 200). Halfway through, the server is
   killed with SIGKILL, restarted on the same database and port, and the phase goes on
   for another half. Every acknowledged post must be stored with the thumb and comment
   that were sent (``fault phase feedback: acknowledged A, stored S of them``); attempts
   that failed while the server was down count as outage, not failure;
5. the limits on: the server is restarted with ``--rate-limit`` ``--limit-rate`` (120, the
   serve default) per minute, ``--max-batch`` ``--limit-max-batch`` (4) and ``--max-queue``
   ``--limit-max-queue`` (4), and ``--clients`` clients stream /v1 chat completions as in
   phase 2, waiting as told by Retry-After when refused: it reports requests completed,
   refused with 429 (rate limit) and with 503 (queue full).

Each request is a SupportWorld support conversation (the system prompt with the
customer's record and their first message, from the run's
``supportworld/conversations/test.jsonl`` when the model belongs to a run; built-in
look-alikes otherwise), ``max_tokens`` 64, temperature 0.7. Requests that start
before the deadline run to the end; every request has a ``--request-timeout`` (120 s)
and one that runs past it counts as hung (and failed). Per phase: requests completed /
refused with 429 / with 503 / failed, p50 and p95 latency, p50 time to first token, and
aggregate completion tokens/s (all clients' completion tokens over the phase's wall
time: from the streamed usage in phases 1, 2 and 5, from the engine's ``tokens_generated``
counter in phase 3); phase 3 has a row each for its conversation, message and
feedback requests.

After phase 3 every answer whose ``done`` event carried a ``message_id`` must be an
assistant row, and every feedback post answered 200 must be a ``message_feedback`` row
with the thumb that was sent (``feedback rows: stored S of submitted N (lost L)``). The
bench exits 1 when a row is lost (phase 3 or 4), a request hung, a request of phases 3-5
failed (anything but completed, refused with 429/503, or the fault phase's outage), or a
server died. Ends with ``ratio batched_16_vs_1_client: X`` (aggregate tokens/s with 16
clients over tokens/s with one; 1.0 would mean no batching gain) and ``ratio
stored_vs_acknowledged_after_sigkill: Y`` (1.000: nothing acknowledged was lost).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
from _common import print_table

T = TypeVar("T")

DEFAULT_MODEL = Path("runs/default/finetune/sft/model")
SYSTEM = ("You are the customer support assistant of SupportWorld, an online shop. Answer from the record "
          "below and the shop's policies, be friendly and concise.\n\nOrder {order}:\n- Status: {status}\n"
          "- Items: {item} x1\n- Carrier: {carrier}")
QUESTIONS = ("Hi, where is my order {order}? It should have arrived by now.",
             "Can I still return the {item} from order {order}?",
             "My order {order} says {status}. What does that mean?",
             "How long does a refund take for order {order}?",
             "Could you change the delivery address of order {order}?")
FOLLOW_UPS = ("Thanks. When will it arrive?", "Can I get a refund instead?", "Okay, and what if it never arrives?",
              "Could you check that again, please?", "Great, thank you!")
ITEMS = ("Halcyon Willow Power Bank", "Aster Trail Backpack", "Nimbus Desk Lamp", "Orbit Wireless Earbuds")
STATUSES = ("shipped", "processing", "delivered", "in transit")
CARRIERS = ("Vector Freight", "Parcelon", "SwiftPost")
TOO_LONG = "too_long"  # send_message's answer when the conversation no longer fits the context
OUTAGE_GRACE = 2.0  # seconds after the restarted server answers /health in which failures still count as outage


@dataclass
class Phase:
    name: str
    clients: int
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    completed: int = 0
    refused_429: int = 0  # the rate limit (or the login throttle)
    refused_503: int = 0  # the engine's queue is full
    failed: int = 0
    hung: int = 0  # of the failed: ran past --request-timeout
    outage: int = 0  # fault phase: attempts that failed while the server was down (expected; not failed)
    wall: float = 0.0
    errors: list[str] = field(default_factory=list)
    streaming: bool = True  # False: small JSON calls, no TTFT or tokens/s

    def fail(self, error: str) -> None:
        self.failed += 1
        self.errors.append(error)


@dataclass
class FeedbackRun:
    """Phase 3: its three kinds of request, and what the clients were told was stored."""

    conversations: Phase
    messages: Phase
    feedback: Phase
    answered: set[int] = field(default_factory=set)  # message_id of every done event that carried one
    submitted: dict[int, int] = field(default_factory=dict)  # message_id -> thumb, for feedback answered 200
    per_client: list[int] = field(default_factory=list)  # feedback posts answered 200, per client
    context_full: int = 0  # messages answered 400 "too long": the client started a new conversation


@dataclass
class FaultRun:
    """Phase 4: feedback posts across a SIGKILL and a restart, and what was acknowledged."""

    phase: Phase
    acknowledged: dict[int, tuple[int, str]] = field(default_factory=dict)  # message_id -> (thumb, comment)
    unacknowledged: dict[int, tuple[int, str]] = field(default_factory=dict)  # sent, never answered 200
    in_flight_at_kill: int = 0
    killed_after: float = float("nan")  # seconds into the phase
    downtime: float = float("nan")  # SIGKILL -> the restarted server answers /health
    exhausted: int = 0  # clients that posted on every answer they had before the end


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def builtin_prompts(n: int, seed: int) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        v = {"order": f"SW-{rng.randrange(10**6, 10**7)}", "item": rng.choice(ITEMS), "status": rng.choice(STATUSES),
             "carrier": rng.choice(CARRIERS)}
        out.append([{"role": "system", "content": SYSTEM.format(**v)},
                    {"role": "user", "content": rng.choice(QUESTIONS).format(**v)}])
    return out


def load_prompts(model_dir: Path, max_tokens: int, seed: int) -> tuple[list[list[dict[str, str]]], str]:
    """Conversations (up to the first user turn) that fit the model's context with ``max_tokens`` to spare."""
    from chatforge.chat.template import render_prompt
    from chatforge.serve.cli import run_dir_of
    from chatforge.train.checkpoint import load_tokenizer_of, read_model_config

    tok = load_tokenizer_of(model_dir)
    context = read_model_config(model_dir)["model"]["block_size"]
    candidates, source = [], "built-in SupportWorld look-alikes"
    run_dir = run_dir_of(model_dir)
    conv = run_dir / "supportworld" / "conversations" / "test.jsonl" if run_dir else None
    if conv is not None and conv.is_file():
        for line in conv.read_text(encoding="utf-8").splitlines()[:2000]:
            msgs = json.loads(line)["messages"]
            first_user = next((i for i, m in enumerate(msgs) if m["role"] == "user"), None)
            if first_user is not None:
                candidates.append(msgs[:first_user + 1])
        source = str(conv)
    if not candidates:
        candidates = builtin_prompts(200, seed)
    fits = [m for m in candidates if len(render_prompt(m, tok)) + max_tokens <= context]
    if not fits:  # long system prompts on a short context: keep the user turn only
        fits = [[m[-1]] for m in candidates if len(render_prompt([m[-1]], tok)) + max_tokens <= context]
    if not fits:
        sys.exit(f"no prompt fits the model's context of {context} tokens with max_tokens {max_tokens}")
    return fits, source


async def timed(aw: Awaitable[T], phase: Phase, timeout: float, what: str) -> T | None:
    """``aw``, or None when it runs past ``timeout`` seconds: a hung request, counted as failed."""
    try:
        return await asyncio.wait_for(aw, timeout)
    except TimeoutError:
        phase.hung += 1
        phase.fail(f"{what}: no answer within {timeout:g} s (hung)")
        return None


async def refused(r: httpx.Response, phase: Phase) -> bool:
    """Count a 429/503 and wait as the server asks; False for any other status."""
    if r.status_code not in (429, 503):
        return False
    await r.aread()
    if r.status_code == 429:
        phase.refused_429 += 1
    else:
        phase.refused_503 += 1
    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
    return True


async def one_request(client: httpx.AsyncClient, body: dict[str, Any], phase: Phase) -> None:
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            if await refused(r, phase):
                return
            if r.status_code != 200:
                phase.fail(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    break
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"]["message"])
                if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, RuntimeError, json.JSONDecodeError) as e:
        phase.fail(f"{type(e).__name__}: {e}")
        return
    phase.completed += 1
    phase.tokens += tokens
    phase.latencies.append(time.perf_counter() - t0)
    if ttft is not None:
        phase.ttfts.append(ttft)


async def run_phase(base: str, phase: Phase, prompts: list[list[dict[str, str]]], duration: float,
                    args: argparse.Namespace) -> Phase:
    limits = httpx.Limits(max_connections=phase.clients + 4, max_keepalive_connections=phase.clients + 4)
    timeout = httpx.Timeout(args.request_timeout + 10)
    async with httpx.AsyncClient(base_url=base, timeout=timeout, limits=limits) as client:
        rng = random.Random(args.seed)
        deadline = time.perf_counter() + duration

        async def worker() -> None:
            while time.perf_counter() < deadline:
                body = {"messages": rng.choice(prompts), "max_tokens": args.max_tokens,
                        "temperature": args.temperature, "stream": True, "stream_options": {"include_usage": True}}
                await timed(one_request(client, body, phase), phase, args.request_timeout, "chat completion")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(phase.clients)))
        phase.wall = time.perf_counter() - t0
    return phase


# --------------------------------------------------------------------------- phase 3: feedback under load


async def post_json(client: httpx.AsyncClient, path: str, body: dict[str, Any], phase: Phase
                    ) -> httpx.Response | None:
    """A small JSON POST counted on ``phase``; the response when it was 200, else None."""
    t0 = time.perf_counter()
    try:
        r = await client.post(path, json=body)  # json= sends Content-Type: application/json
    except httpx.HTTPError as e:
        phase.fail(f"POST {path}: {type(e).__name__}: {e}")
        return None
    if await refused(r, phase):
        return None
    if r.status_code != 200:
        phase.fail(f"POST {path}: HTTP {r.status_code}: {r.text[:200]!r}")
        return None
    phase.completed += 1
    phase.latencies.append(time.perf_counter() - t0)
    return r


async def send_message(client: httpx.AsyncClient, conv_id: int, content: str, run: FeedbackRun,
                       args: argparse.Namespace) -> int | str | None:
    """Send a chat message and read the answer's SSE stream to its done event: the stored answer's
    message_id, ``TOO_LONG`` when the conversation no longer fits, None when there is nothing to rate."""
    phase = run.messages
    path = f"/api/conversations/{conv_id}/messages"
    t0 = time.perf_counter()
    ttft, done, error = None, None, None
    body = {"content": content, "max_tokens": args.max_tokens, "temperature": args.temperature}
    try:
        async with client.stream("POST", path, json=body) as r:
            if await refused(r, phase):
                return None
            if r.status_code != 200:
                text = (await r.aread()).decode("utf-8", "replace")
                if r.status_code == 400 and "too long" in text.lower():
                    return TOO_LONG
                phase.fail(f"POST {path}: HTTP {r.status_code}: {text[:200]!r}")
                return None
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if ttft is None and event.get("delta"):
                    ttft = time.perf_counter() - t0
                if "error" in event:
                    error = event["error"]
                if event.get("done"):
                    done = event
                    break
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        phase.fail(f"POST {path}: {type(e).__name__}: {e}")
        return None
    if done is None:
        phase.fail(f"POST {path}: the stream ended without a done event")
        return None
    message_id = done.get("message_id")
    if message_id is not None:
        run.answered.add(message_id)
    if error or done.get("finish_reason") not in ("stop", "length"):
        phase.fail(f"POST {path}: finish_reason {done.get('finish_reason')!r}, error {error!r}")
    else:
        phase.completed += 1
        phase.latencies.append(time.perf_counter() - t0)
        if ttft is not None:
            phase.ttfts.append(ttft)
    return message_id


def engine_tokens(base: str) -> int:
    engines = httpx.get(base + "/health", timeout=10).json()["engine"]
    return sum(e.get("tokens_generated", 0) for e in engines.values())


async def run_feedback_phase(base: str, prompts: list[list[dict[str, str]]], admin: tuple[str, str], run_id: str,
                             args: argparse.Namespace) -> FeedbackRun:
    n = args.clients
    name = f"{n} clients + feedback"
    run = FeedbackRun(conversations=Phase(f"{name}: conversations", n, streaming=False),
                      messages=Phase(f"{name}: messages", n), feedback=Phase(f"{name}: feedback", n, streaming=False),
                      per_client=[0] * n)
    timeout = httpx.Timeout(args.request_timeout + 10)
    password = secrets.token_urlsafe(16)
    usernames = [f"bench-reviewer-{run_id}-{i}" for i in range(n)]
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as as_admin:  # setup: not timed, must work
        r = await as_admin.post("/api/login", json={"username": admin[0], "password": admin[1]})
        if r.status_code != 200:
            sys.exit(f"admin login failed: HTTP {r.status_code}: {r.text[:300]}")
        for username in usernames:
            r = await as_admin.post("/api/admin/users", json={"username": username, "password": password,
                                                              "role": "reviewer"})
            if r.status_code != 200:
                sys.exit(f"creating user {username} failed: HTTP {r.status_code}: {r.text[:300]}")
    clients = [httpx.AsyncClient(base_url=base, timeout=timeout) for _ in range(n)]  # one cookie jar each
    try:
        for client, username in zip(clients, usernames, strict=True):
            r = await client.post("/api/login", json={"username": username, "password": password})
            if r.status_code != 200:
                sys.exit(f"login of {username} failed: HTTP {r.status_code}: {r.text[:300]}")

        deadline = time.perf_counter() + args.duration

        async def worker(i: int, client: httpx.AsyncClient) -> None:
            rng = random.Random(args.seed * 7919 + i)
            conv_id, turns = None, 0
            while time.perf_counter() < deadline:
                if conv_id is None or turns >= args.turns:
                    prompt = rng.choice(prompts)
                    body = {"system": prompt[0]["content"]} if prompt[0]["role"] == "system" else {}
                    r = await timed(post_json(client, "/api/conversations", body, run.conversations),
                                    run.conversations, args.request_timeout, "POST /api/conversations")
                    if r is None:
                        await asyncio.sleep(0.1)  # a failure: do not spin
                        continue
                    conv_id, turns, content = r.json()["id"], 0, prompt[-1]["content"]
                else:
                    content = rng.choice(FOLLOW_UPS)
                answer = await timed(send_message(client, conv_id, content, run, args), run.messages,
                                     args.request_timeout, f"POST /api/conversations/{conv_id}/messages")
                if answer == TOO_LONG:
                    if turns == 0:  # a fresh conversation must fit: load_prompts checked that
                        run.messages.fail(f"conversation {conv_id}: the first message is too long")
                    run.context_full += 1
                    conv_id = None
                    continue
                turns += 1
                if answer is None:
                    await asyncio.sleep(0.1)
                    continue
                thumb = rng.choice((1, -1))
                body = {"thumb": thumb, "comment": f"bench client {i}: {'good' if thumb > 0 else 'bad'} answer"}
                r = await timed(post_json(client, f"/api/messages/{answer}/feedback", body, run.feedback),
                                run.feedback, args.request_timeout, f"POST /api/messages/{answer}/feedback")
                if r is not None:
                    run.submitted[answer] = thumb
                    run.per_client[i] += 1

        tokens0 = engine_tokens(base)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(i, c) for i, c in enumerate(clients)))
        wall = time.perf_counter() - t0
        run.messages.tokens = engine_tokens(base) - tokens0
        for phase in (run.conversations, run.messages, run.feedback):
            phase.wall = wall
    finally:
        for client in clients:
            await client.aclose()
    return run


# --------------------------------------------------------------------------- counting through the store


def _chunks(ids: Iterable[int], size: int = 500) -> Iterable[list[int]]:
    ids = sorted(ids)
    for i in range(0, len(ids), size):
        yield ids[i:i + size]


def stored_feedback(store: Any, message_ids: Iterable[int]) -> dict[int, tuple[int, str | None]]:
    """message_id -> (thumb, comment) of the feedback rows on those messages, read through the store."""
    from sqlalchemy import select

    from chatforge.store.models import MessageFeedback

    out = {}
    with store.session(write=False) as s:
        for chunk in _chunks(message_ids):
            for mid, thumb, comment in s.execute(select(MessageFeedback.message_id, MessageFeedback.thumb,
                                                        MessageFeedback.comment)
                                                 .where(MessageFeedback.message_id.in_(chunk))):
                out[mid] = (thumb, comment)
    return out


def check_stored(store: Any, run: FeedbackRun) -> list[str]:
    """Print what was stored of what the clients were told (counted through the store); the losses."""
    from sqlalchemy import func, select

    from chatforge.store.models import Message, MessageFeedback

    with store.session(write=False) as s:
        assistant: set[int] = set()
        for chunk in _chunks(run.answered):
            assistant |= set(s.scalars(select(Message.id).where(Message.role == "assistant", Message.id.in_(chunk))))
        n_assistant = s.scalar(select(func.count()).select_from(Message).where(Message.role == "assistant"))
        n_feedback = s.scalar(select(func.count()).select_from(MessageFeedback))
    thumbs = {mid: thumb for mid, (thumb, _) in stored_feedback(store, run.submitted).items()}
    problems = []
    for what, stored, submitted, total in (
            ("assistant messages", len(run.answered & assistant), len(run.answered), n_assistant),
            ("feedback rows", sum(thumbs.get(m) == t for m, t in run.submitted.items()), len(run.submitted),
             n_feedback)):
        lost = submitted - stored
        print(f"{what}: stored {stored} of submitted {submitted} (lost {lost}); {total} in the database")
        if lost:
            problems.append(f"{lost} {what} lost")
    if not run.submitted:
        problems.append("no feedback post was answered 200: nothing was checked")
    return problems


# --------------------------------------------------------------------------- phase 4: SIGKILL under feedback


def prepare_fault_phase(store: Any, model_id: str, run_id: str, args: argparse.Namespace
                        ) -> list[tuple[str, list[int]]]:
    """Per client: a reviewer's session token and the ids of ``--fault-messages`` answers in their own
    conversation, written through the store (one transaction per client: setup, not measured)."""
    from chatforge.store import service
    from chatforge.store.models import Message

    out = []
    for i in range(args.clients):
        user = service.create_user(store, f"bench-fault-{run_id}-{i}", secrets.token_urlsafe(16), "reviewer")
        token = service.create_session(store, user["id"])
        conv_id = service.create_conversation(store, user["id"], model_id)
        with store.session() as s:
            questions = [Message(conversation_id=conv_id, role="user", content=f"fault-phase question {k}",
                                 position=2 * k) for k in range(args.fault_messages)]
            s.add_all(questions)
            s.flush()
            answers = [Message(conversation_id=conv_id, role="assistant", content=f"fault-phase answer {k}",
                               model_id=model_id, parent_id=q.id, position=2 * k + 1, finish_reason="stop")
                       for k, q in enumerate(questions)]
            s.add_all(answers)
            s.flush()
            out.append((token, [a.id for a in answers]))
    return out


async def run_fault_phase(server: Server, clients_data: list[tuple[str, list[int]]],
                          args: argparse.Namespace) -> FaultRun:
    n = len(clients_data)
    fault = FaultRun(phase=Phase(f"{n} clients feedback, SIGKILL + restart", n, streaming=False))
    phase = fault.phase
    timeout = httpx.Timeout(args.request_timeout + 10)
    window: list[float] = []  # [killed at, back at]: failures in it (plus OUTAGE_GRACE) are the outage
    in_flight = 0
    t_start = time.perf_counter()
    deadline = [t_start + args.fault_duration]  # moved when the server is back: the second half runs after it

    def during_outage(*times: float) -> bool:
        if not window:
            return False
        end = window[1] + OUTAGE_GRACE if len(window) > 1 else float("inf")
        return any(window[0] <= t <= end for t in times)

    async def worker(i: int, client: httpx.AsyncClient, ids: list[int]) -> None:
        nonlocal in_flight
        rng = random.Random(args.seed * 104729 + i)
        k = 0
        while k < len(ids) and time.perf_counter() < deadline[0]:
            mid = ids[k]
            thumb = 1 if rng.random() < 0.5 else -1
            comment = f"fault phase: client {i}, answer {mid}, thumb {thumb}"
            body = {"thumb": thumb, "comment": comment}
            t0 = time.perf_counter()
            in_flight += 1
            status, error = None, None
            try:
                r = await asyncio.wait_for(client.post(f"/api/messages/{mid}/feedback", json=body),
                                           args.request_timeout)
                status = r.status_code
            except TimeoutError:
                phase.hung += 1
                error = f"POST /api/messages/{mid}/feedback: no answer within {args.request_timeout:g} s (hung)"
            except httpx.HTTPError as e:
                error = f"POST /api/messages/{mid}/feedback: {type(e).__name__}: {e}"
            finally:
                in_flight -= 1
            if status == 200:
                fault.acknowledged[mid] = (thumb, comment)
                fault.unacknowledged.pop(mid, None)
                phase.completed += 1
                phase.latencies.append(time.perf_counter() - t0)
                k += 1
                continue
            if status in (429, 503) and await refused(r, phase):
                continue
            fault.unacknowledged[mid] = (thumb, comment)  # it may or may not have been stored
            if status is not None:
                error = f"POST /api/messages/{mid}/feedback: HTTP {status}: {r.text[:200]!r}"
            if during_outage(t0, time.perf_counter()):
                phase.outage += 1
            else:
                phase.fail(error or "unknown failure")
            await asyncio.sleep(0.2)  # the server is down or failing: do not spin, then retry this answer
        if k == len(ids):
            fault.exhausted += 1

    async def killer() -> None:
        await asyncio.sleep(args.fault_duration / 2)
        fault.in_flight_at_kill = in_flight
        window.append(time.perf_counter())
        fault.killed_after = window[0] - t_start
        server.kill()
        await asyncio.to_thread(server.start)  # same database, same port; returns once /health answers
        window.append(time.perf_counter())
        fault.downtime = window[1] - window[0]
        deadline[0] = window[1] + args.fault_duration / 2

    clients = []
    for token, _ in clients_data:
        client = httpx.AsyncClient(base_url=server.base, timeout=timeout)
        client.cookies.set("cf_session", token)  # the session lives in the database: it survives the restart
        clients.append(client)
    try:
        await asyncio.gather(killer(), *(worker(i, c, ids) for i, (c, (_, ids)) in enumerate(zip(clients, clients_data))))
    finally:
        for client in clients:
            await client.aclose()
    phase.wall = time.perf_counter() - t_start
    return fault


def check_fault(store: Any, fault: FaultRun) -> tuple[list[str], float]:
    """Print acknowledged vs stored for the fault phase (counted through the store); the losses and the ratio."""
    stored = stored_feedback(store, set(fault.acknowledged) | set(fault.unacknowledged))
    kept = sum(stored.get(mid) == sent for mid, sent in fault.acknowledged.items())
    lost = len(fault.acknowledged) - kept
    extra = sum(mid in stored for mid in fault.unacknowledged)
    print(f"fault phase: SIGKILL after {fault.killed_after:.1f} s with {fault.in_flight_at_kill} feedback posts in "
          f"flight; the restarted server answered /health {fault.downtime:.1f} s later; {fault.phase.outage} attempts "
          f"failed while it was down (each retried)")
    print(f"fault phase feedback: acknowledged {len(fault.acknowledged)}, stored {kept} of them (lost {lost}); "
          f"{len(fault.unacknowledged)} answers whose posts were never acknowledged, {extra} of them stored anyway")
    problems = [f"{lost} acknowledged feedback posts lost after SIGKILL"] if lost else []
    if not fault.acknowledged:
        problems.append("the fault phase acknowledged no feedback post: nothing was checked")
    if fault.exhausted:
        print(f"  note: {fault.exhausted} clients posted on every answer they had before the end (raise "
              "--fault-messages for a longer load)")
    return problems, (kept / len(fault.acknowledged) if fault.acknowledged else float("nan"))


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One ``chatforge serve`` process on a fixed loopback port; it can be killed and started again."""

    def __init__(self, args: argparse.Namespace, db_url: str, log_dir: Path, port: int) -> None:
        self.args, self.db_url, self.log_dir, self.port = args, db_url, log_dir, port
        self.base = f"http://127.0.0.1:{port}"
        self.flags: dict[str, str] = {"--rate-limit": "0", "--max-batch": str(args.max_batch)}
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.log_path = log_dir / "server-0.log"

    def start(self, **flags: str) -> None:
        """Start it (``flags`` override the serve flags from now on) and wait until /health answers."""
        self.flags.update(flags)
        self.starts += 1
        self.log_path = self.log_dir / f"server-{self.starts}.log"
        cmd = [sys.executable, "-m", "chatforge.serve.cli", str(self.args.model), "--db", self.db_url,
               "--host", "127.0.0.1", "--port", str(self.port), "--device", self.args.device,
               "--access-log", os.devnull, *(x for kv in self.flags.items() for x in kv),
               *(["--compile"] if self.args.compile else [])]
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        t0 = time.monotonic()
        while True:
            if self.proc.poll() is not None:
                sys.exit(f"the server exited with code {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() - t0 > 180:
                self.proc.kill()
                sys.exit(f"the server did not answer /health within 180 s:\n{self.log_path.read_text()}")
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL: no shutdown, no flush; whatever the database committed is all that is left."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def problem(self) -> str | None:
        """Why the server is no longer serving (with its log's tail), or None when it answers /health."""
        assert self.proc is not None
        if self.proc.poll() is None:
            try:
                if httpx.get(self.base + "/health", timeout=30).status_code == 200:
                    return None
            except httpx.HTTPError as e:
                return f"the server stopped answering /health ({type(e).__name__}: {e})"
            return "the server answers /health with an error"
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        return f"the server died (exit code {self.proc.returncode}); its log ends:\n{tail}"

    def stats(self) -> Any:
        return httpx.get(self.base + "/health", timeout=30).json()["engine"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help=f"model directory (default {DEFAULT_MODEL})")
    ap.add_argument("--db", metavar="URL", help="feedback database, any SQLAlchemy URL the bench may write to "
                                               "(default: a SQLite file in a temp directory)")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients of phases 2 to 5")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--device", default="auto", help="the server's --device")
    ap.add_argument("--compile", action="store_true",
                    help="start the server with --compile (a compiled prefill; the server compiles before /health "
                         "answers, so no phase pays for it)")
    ap.add_argument("--turns", type=int, default=3, help="messages per conversation in the feedback phase")
    ap.add_argument("--fault-duration", type=float, default=None,
                    help="seconds of the fault phase, half before the SIGKILL and half after the restart "
                         "(default --duration)")
    ap.add_argument("--fault-messages", type=int, default=1000, help="stored answers per client to post feedback on")
    ap.add_argument("--limit-rate", type=int, default=120, help="phase 5: the server's --rate-limit (per minute)")
    ap.add_argument("--limit-max-batch", type=int, default=4, help="phase 5: the server's --max-batch")
    ap.add_argument("--limit-max-queue", type=int, default=4, help="phase 5: the server's --max-queue")
    ap.add_argument("--request-timeout", type=float, default=120.0,
                    help="seconds one request may take; longer counts as hung (a failure)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.fault_duration = args.fault_duration or args.duration
    if (args.duration <= 0 or args.fault_duration <= 0 or args.clients < 1 or args.max_tokens < 1 or args.turns < 1
            or args.request_timeout <= 0 or args.fault_messages < 1 or min(args.limit_rate, args.limit_max_batch) < 1
            or args.limit_max_queue < 0):
        ap.error("--duration, --fault-duration, --clients, --max-tokens, --turns, --request-timeout, --fault-messages, "
                 "--limit-rate and --limit-max-batch must be positive, --limit-max-queue at least 0")
    if not (args.model / "config.json").is_file():
        ap.error(f"{args.model} is not a model directory (run `chatforge pipeline run` first, or pass one)")

    from chatforge.store import service
    from chatforge.store.db import Store

    prompts, source = load_prompts(args.model, args.max_tokens, args.seed)
    phases: list[Phase] = []
    problems: list[str] = []
    stats: Any = None
    fault_ratio = float("nan")
    run_id = secrets.token_hex(3)
    with tempfile.TemporaryDirectory() as tmp:
        db_url = args.db or f"sqlite:///{Path(tmp) / 'feedback.db'}"
        store = Store(db_url)  # migrated now, before any server opens it
        admin = (f"bench-admin-{run_id}", secrets.token_urlsafe(16))
        service.create_user(store, admin[0], admin[1], "admin")
        server = Server(args, db_url, Path(tmp), free_port())
        server.start()
        try:
            health = httpx.get(server.base + "/health", timeout=10).json()
            print(f"server: {server.base}, model {', '.join(health['models'])} ({args.model}), device {args.device}, "
                  f"max_batch {args.max_batch}, prefill {'compiled' if args.compile else 'eager'}, database {store.safe_url}; cpu cores: {os.cpu_count()}")
            print(f"prompts: {len(prompts)} from {source}; max_tokens {args.max_tokens}, temperature "
                  f"{args.temperature}; {args.duration:g} s per phase, request timeout {args.request_timeout:g} s")
            for name, n in (("1 client", 1), (f"{args.clients} clients", args.clients)):
                phase = asyncio.run(run_phase(server.base, Phase(name, n), prompts, args.duration, args))
                phases.append(phase)
                print(f"phase '{name}' done: {phase.completed} requests in {phase.wall:.1f} s", flush=True)
                problems += [p for p in [server.problem()] if p]
                if problems:
                    break
            if not problems:
                feedback = asyncio.run(run_feedback_phase(server.base, prompts, admin, run_id, args))
                phases += [feedback.conversations, feedback.messages, feedback.feedback]
                print(f"phase '{args.clients} clients + feedback' done: {feedback.messages.completed} messages, "
                      f"{len(feedback.submitted)} feedback posts in {feedback.messages.wall:.1f} s", flush=True)
                problems += [p for p in [server.problem()] if p]
                problems += check_stored(store, feedback)  # the database survives a dead server
                print(f"feedback phase: {len(feedback.answered)} answers stored, {feedback.context_full} messages too "
                      f"long for the context (the client started a new conversation); feedback answered 200 per "
                      f"client: {' '.join(map(str, feedback.per_client))}")
                failed = sum(p.failed for p in (feedback.conversations, feedback.messages, feedback.feedback))
                if failed:
                    problems.append(f"{failed} requests of the feedback phase failed (neither completed nor refused)")
            if not problems:
                data = prepare_fault_phase(store, health["models"][0], run_id, args)
                fault = asyncio.run(run_fault_phase(server, data, args))
                phases.append(fault.phase)
                problems += [p for p in [server.problem()] if p]
                more, fault_ratio = check_fault(store, fault)
                problems += more
                if fault.phase.failed:
                    problems.append(f"{fault.phase.failed} requests of the fault phase failed outside the outage")
            if not problems:
                server.stop()
                server.start(**{"--rate-limit": str(args.limit_rate), "--max-batch": str(args.limit_max_batch),
                                "--max-queue": str(args.limit_max_queue)})
                name = (f"{args.clients} clients, limits on (rate {args.limit_rate}/min, max_batch "
                        f"{args.limit_max_batch}, max_queue {args.limit_max_queue})")
                limited = asyncio.run(run_phase(server.base, Phase(name, args.clients), prompts, args.duration, args))
                phases.append(limited)
                print(f"phase 'limits on' done: {limited.completed} completed, {limited.refused_429} refused with 429, "
                      f"{limited.refused_503} with 503 in {limited.wall:.1f} s", flush=True)
                problems += [p for p in [server.problem()] if p]
                if limited.failed:
                    problems.append(f"{limited.failed} requests with the limits on failed (neither completed nor "
                                    "refused with 429/503)")
            if server.proc is not None and server.proc.poll() is None:
                stats = server.stats()
        finally:
            server.stop()
            store.close()

    print()
    rows = []
    for p in phases:
        rows.append([p.name, str(p.completed), str(p.refused_429), str(p.refused_503), str(p.failed), str(p.hung),
                     str(p.outage) if p.outage else "-",
                     f"{percentile(p.latencies, 0.5):.3f}", f"{percentile(p.latencies, 0.95):.3f}",
                     f"{percentile(p.ttfts, 0.5) * 1e3:.0f}" if p.streaming else "-",
                     (f"{p.tokens / p.wall:,.1f}" if p.wall else "0") if p.streaming else "-"])
    print_table(["phase", "completed", "429", "503", "failed", "hung", "outage", "p50 latency s", "p95 latency s",
                 "p50 TTFT ms", "completion tok/s"], rows)
    for p in phases:
        for err in p.errors[:3]:
            print(f"  {p.name}: {err}")
    hung = sum(p.hung for p in phases)
    if hung:
        problems.append(f"{hung} requests hung (no answer within {args.request_timeout:g} s)")
    if stats is not None:
        print(f"engine (limits-on server): {json.dumps(stats)}")
    print()
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print(f"acceptance: ok ({args.clients} clients with feedback, across a SIGKILL and with the limits on: every "
              "request completed or was refused with 429/503 (or failed only while the server was down), none hung, "
              "no acknowledged row lost, the server stayed up)")
    single, batched = (p.tokens / p.wall if p.wall else 0.0 for p in phases[:2]) if len(phases) >= 2 else (0.0, 0.0)
    print(f"ratio batched_{args.clients}_vs_1_client: {batched / single if single else float('nan'):.3f}")
    print(f"ratio stored_vs_acknowledged_after_sigkill: {fault_ratio:.3f}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
