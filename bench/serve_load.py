"""Serving under load: what continuous batching buys when many clients stream at once,
and that chat feedback is neither lost nor stuck when they do.

    python bench/serve_load.py                                   # runs/default/finetune/sft/model, 60 s per phase
    python bench/serve_load.py runs/x/finetune/sft/model --duration 5 --device cpu

Starts ``chatforge serve MODEL --db sqlite:///TMP/feedback.db`` (``python -m
chatforge.serve.cli``, rate limit off, a random admin password through
``CHATFORGE_ADMIN_PASSWORD``) on a free loopback port, then runs three phases of
``--duration`` seconds each:

1. one client sending streaming chat requests to /v1/chat/completions back to back;
2. ``--clients`` (16) clients doing the same concurrently (httpx, asyncio);
3. feedback under load: the admin creates ``--clients`` reviewer users (POST
   /api/admin/users); each logs in (POST /api/login, cookie session), opens a
   conversation (POST /api/conversations, with the request's system prompt) and loops:
   send a message (POST /api/conversations/{id}/messages, ``max_tokens`` 64), read the
   SSE stream to its ``{"done": true, "message_id": ...}`` event, then thumb the answer
   up or down with a comment (POST /api/messages/{id}/feedback). A conversation gets
   ``--turns`` (3) messages, or fewer when the server says it no longer fits the
   context, then the client starts a new one.

Each request is a SupportWorld support conversation (the system prompt with the
customer's record and their first message, from the run's
``supportworld/conversations/test.jsonl`` when the model belongs to a run; built-in
look-alikes otherwise), ``max_tokens`` 64, temperature 0.7. Requests that start
before the deadline run to the end; every request has a ``--request-timeout`` (120 s)
and one that runs past it counts as hung (and failed). Per phase: requests completed /
refused (429, 503) / failed, p50 and p95 latency, p50 time to first token, and
aggregate completion tokens/s (all clients' completion tokens over the phase's wall
time: from the streamed usage in phases 1-2, from the engine's ``tokens_generated``
counter in phase 3); phase 3 has a row each for its conversation, message and
feedback requests.

After phase 3 the SQLite file is read directly: every answer whose ``done`` event
carried a ``message_id`` must be an assistant row, and every feedback post answered
200 must be a ``message_feedback`` row with the thumb that was sent
(``feedback rows: stored S of submitted N (lost L)``). The bench exits 1 when a row is
lost, a request hung or failed in phase 3 (anything but completed or refused with
429/503), or the server died. Ends with ``ratio batched_16_vs_1_client: X``: aggregate
tokens/s with 16 clients over tokens/s with one; 1.0 would mean no batching gain.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import secrets
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
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


@dataclass
class Phase:
    name: str
    clients: int
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    tokens: int = 0
    completed: int = 0
    refused: int = 0
    failed: int = 0
    hung: int = 0  # of the failed: ran past --request-timeout
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
    phase.refused += 1
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


async def run_feedback_phase(base: str, prompts: list[list[dict[str, str]]], admin_password: str,
                             args: argparse.Namespace) -> FeedbackRun:
    n = args.clients
    name = f"{n} clients + feedback"
    run = FeedbackRun(conversations=Phase(f"{name}: conversations", n, streaming=False),
                      messages=Phase(f"{name}: messages", n), feedback=Phase(f"{name}: feedback", n, streaming=False),
                      per_client=[0] * n)
    timeout = httpx.Timeout(args.request_timeout + 10)
    password = secrets.token_urlsafe(16)
    usernames = [f"bench-reviewer-{i}" for i in range(n)]
    async with httpx.AsyncClient(base_url=base, timeout=timeout) as admin:  # setup: not timed, must work
        r = await admin.post("/api/login", json={"username": "admin", "password": admin_password})
        if r.status_code != 200:
            sys.exit(f"admin login failed: HTTP {r.status_code}: {r.text[:300]}")
        for username in usernames:
            r = await admin.post("/api/admin/users", json={"username": username, "password": password,
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


def check_stored(db_path: Path, run: FeedbackRun) -> list[str]:
    """Read the SQLite file directly; print what was stored of what the clients were told; the losses."""
    con = sqlite3.connect(db_path)
    try:
        assistant = {row[0] for row in con.execute("SELECT id FROM messages WHERE role = 'assistant'")}
        thumbs = dict(con.execute("SELECT message_id, thumb FROM message_feedback").fetchall())
    finally:
        con.close()
    problems = []
    for what, stored, submitted, total in (
            ("assistant messages", len(run.answered & assistant), len(run.answered), len(assistant)),
            ("feedback rows", sum(thumbs.get(m) == t for m, t in run.submitted.items()), len(run.submitted),
             len(thumbs))):
        lost = submitted - stored
        print(f"{what}: stored {stored} of submitted {submitted} (lost {lost}); {total} in the database")
        if lost:
            problems.append(f"{lost} {what} lost")
    if not run.submitted:
        problems.append("no feedback post was answered 200: nothing was checked")
    return problems


# --------------------------------------------------------------------------- the server


def start_server(args: argparse.Namespace, db_path: Path, admin_password: str, log_path: Path
                 ) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "chatforge.serve.cli", str(args.model), "--db", f"sqlite:///{db_path}",
           "--host", "127.0.0.1", "--port", str(port), "--rate-limit", "0", "--max-batch", str(args.max_batch),
           "--device", args.device, "--access-log", os.devnull]
    env = {**os.environ, "CHATFORGE_ADMIN_PASSWORD": admin_password}  # not on the command line
    log = open(log_path, "w")  # noqa: SIM115 - the server writes here until it is stopped
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        if proc.poll() is not None:
            sys.exit(f"the server exited with code {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            pass
        if time.monotonic() - t0 > 180:
            proc.kill()
            sys.exit(f"the server did not answer /health within 180 s:\n{log_path.read_text()}")
        time.sleep(0.2)


def server_problem(proc: subprocess.Popen, base: str, log_path: Path) -> str | None:
    """Why the server is no longer serving (with its log's tail), or None when it answers /health."""
    if proc.poll() is None:
        try:
            if httpx.get(base + "/health", timeout=30).status_code == 200:
                return None
        except httpx.HTTPError as e:
            return f"the server stopped answering /health ({type(e).__name__}: {e})"
        return "the server answers /health with an error"
    tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
    return f"the server died (exit code {proc.returncode}); its log ends:\n{tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=DEFAULT_MODEL, help=f"model directory (default {DEFAULT_MODEL})")
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per phase")
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients of the second and third phases")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-batch", type=int, default=16, help="the server's --max-batch")
    ap.add_argument("--device", default="auto", help="the server's --device")
    ap.add_argument("--turns", type=int, default=3, help="messages per conversation in the feedback phase")
    ap.add_argument("--request-timeout", type=float, default=120.0,
                    help="seconds one request may take; longer counts as hung (a failure)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.duration <= 0 or args.clients < 1 or args.max_tokens < 1 or args.turns < 1 or args.request_timeout <= 0:
        ap.error("--duration, --clients, --max-tokens, --turns and --request-timeout must be positive")
    if not (args.model / "config.json").is_file():
        ap.error(f"{args.model} is not a model directory (run `chatforge pipeline run` first, or pass one)")

    prompts, source = load_prompts(args.model, args.max_tokens, args.seed)
    phases: list[Phase] = []
    feedback: FeedbackRun | None = None
    problems: list[str] = []
    stats: Any = None
    with tempfile.TemporaryDirectory() as tmp:
        log_path, db_path = Path(tmp) / "server.log", Path(tmp) / "feedback.db"
        admin_password = secrets.token_urlsafe(16)
        proc, base = start_server(args, db_path, admin_password, log_path)
        try:
            health = httpx.get(base + "/health", timeout=10).json()
            print(f"server: {base}, model {', '.join(health['models'])} ({args.model}), device {args.device}, "
                  f"max_batch {args.max_batch}, database {db_path.name}; cpu cores: {os.cpu_count()}")
            print(f"prompts: {len(prompts)} from {source}; max_tokens {args.max_tokens}, temperature "
                  f"{args.temperature}; {args.duration:g} s per phase, request timeout {args.request_timeout:g} s")
            for name, n in (("1 client", 1), (f"{args.clients} clients", args.clients)):
                phase = asyncio.run(run_phase(base, Phase(name, n), prompts, args.duration, args))
                phases.append(phase)
                print(f"phase '{name}' done: {phase.completed} requests in {phase.wall:.1f} s", flush=True)
                problem = server_problem(proc, base, log_path)
                if problem:
                    problems.append(problem)
                    break
            if not problems:
                feedback = asyncio.run(run_feedback_phase(base, prompts, admin_password, args))
                phases += [feedback.conversations, feedback.messages, feedback.feedback]
                print(f"phase '{args.clients} clients + feedback' done: {feedback.messages.completed} messages, "
                      f"{len(feedback.submitted)} feedback posts in {feedback.messages.wall:.1f} s", flush=True)
                problem = server_problem(proc, base, log_path)
                if problem:
                    problems.append(problem)
                problems += check_stored(db_path, feedback)  # the files survive a dead server
            if proc.poll() is None:
                stats = httpx.get(base + "/health", timeout=30).json()["engine"]
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()

    print()
    rows = []
    for p in phases:
        rows.append([p.name, str(p.completed), str(p.refused), str(p.failed), str(p.hung),
                     f"{percentile(p.latencies, 0.5):.3f}", f"{percentile(p.latencies, 0.95):.3f}",
                     f"{percentile(p.ttfts, 0.5) * 1e3:.0f}" if p.streaming else "-",
                     (f"{p.tokens / p.wall:,.1f}" if p.wall else "0") if p.streaming else "-"])
    print_table(["phase", "completed", "refused", "failed", "hung", "p50 latency s", "p95 latency s",
                 "p50 TTFT ms", "completion tok/s"], rows)
    for p in phases:
        for err in p.errors[:3]:
            print(f"  {p.name}: {err}")
    if feedback is not None:
        print(f"feedback phase: {len(feedback.answered)} answers stored, {feedback.context_full} messages too long "
              f"for the context (the client started a new conversation); feedback answered 200 per client: "
              f"{' '.join(map(str, feedback.per_client))}")
        failed = sum(p.failed for p in (feedback.conversations, feedback.messages, feedback.feedback))
        if failed:
            problems.append(f"{failed} requests of the feedback phase failed (neither completed nor refused)")
    hung = sum(p.hung for p in phases)
    if hung:
        problems.append(f"{hung} requests hung (no answer within {args.request_timeout:g} s)")
    if stats is not None:
        print(f"engine: {json.dumps(stats)}")
    print()
    for problem in problems:
        print(f"FAIL: {problem}")
    if not problems:
        print(f"acceptance: ok ({args.clients} clients with feedback: every request completed or was refused with "
              "429/503, none hung, no row lost, the server stayed up)")
    single, batched = (p.tokens / p.wall if p.wall else 0.0 for p in phases[:2]) if len(phases) >= 2 else (0.0, 0.0)
    print(f"ratio batched_{args.clients}_vs_1_client: {batched / single if single else float('nan'):.3f}")
    if problems:
        sys.exit(1)


if __name__ == "__main__":
    main()
