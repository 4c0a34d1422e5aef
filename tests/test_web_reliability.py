"""The web app when things go wrong, on SQLite and on PostgreSQL (tests/db_backends.py).

- simultaneous messages into one conversation (a double click, two tabs) all get stored, in order;
- a database that refuses a write ends the stream with an error event naming what failed, the
  answer still reaches the client (and is stored on a second try when the failure passes);
- text no database can store (NUL, unpaired surrogates) is refused before anything is generated;
- the database password never shows in the server's output.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from ci import skip_or_fail
from db_backends import MISSING, fresh_database, server_url
from serve_fixtures import (
    ADMIN_PASSWORD,
    build_app,
    free_port,
    live_server,
    never_stop,
    read_sse,
    save_tiny_model,
)
from sqlalchemy.engine import make_url

import chatforge
from chatforge.store import service

TIMEOUT = 60  # seconds without a byte before a stream counts as hung


@contextmanager
def logged_in(base: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        r = http.post("/api/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        assert r.status_code == 200, r.text
        yield http


def send(http: httpx.Client, conv_id: int, content: str, **params) -> list[dict] | None:
    """The events of one message's answer stream; None when it hung (no byte for TIMEOUT seconds)."""
    try:
        with http.stream("POST", f"/api/conversations/{conv_id}/messages",
                         json={"content": content, "max_tokens": 8, **params}) as r:
            assert r.status_code == 200, r.read()
            return read_sse(r.iter_lines())
    except httpx.TimeoutException:
        return None


# --------------------------------------------------------------------------- simultaneous sends


def test_simultaneous_sends_into_one_conversation(tmp_path, db_url):
    """10 rounds of 3 messages posted at the same moment into one conversation: 30 of 30 streams end
    with a stored answer, none hangs, and the conversation holds all 60 messages, each answer after
    its question (on PostgreSQL, 2 of 3 used to fail on the unique (conversation, position))."""
    app, _ = build_app(tmp_path, db_url=db_url)
    rounds, width = 10, 3
    results: list[list[dict] | None] = []
    with live_server(app) as base, logged_in(base) as admin:
        conv_id = admin.post("/api/conversations", json={}).json()["id"]
        clients = [httpx.Client(base_url=base, timeout=TIMEOUT, cookies=admin.cookies) for _ in range(width)]

        def one(http: httpx.Client, barrier: threading.Barrier, k: int) -> None:
            barrier.wait()
            results.append(send(http, conv_id, str(k), max_tokens=2))  # short: 60 messages fit the context

        for r in range(rounds):
            barrier = threading.Barrier(width)
            threads = [threading.Thread(target=one, args=(clients[i], barrier, r * width + i)) for i in range(width)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=3 * TIMEOUT)
        for c in clients:
            c.close()
        messages = admin.get(f"/api/conversations/{conv_id}").json()["messages"]
    app.state.cf.store.close()
    hung = sum(events is None for events in results)
    done = [events[-1] for events in results if events and events[-1].get("done")]
    stored = [events for events in results
              if events and events[-1].get("message_id") and not any("error" in e for e in events)]
    print(f"{make_url(db_url).get_backend_name()}: {len(stored)}/{rounds * width} simultaneous sends "
          f"stored, {hung} hung")
    assert hung == 0 and len(results) == rounds * width
    assert len(stored) == rounds * width, [events[-2:] for events in results if events]
    order = [m["id"] for m in messages]  # the API returns them in position order
    assert len(order) == 2 * rounds * width
    assert {m["id"] for m in messages if m["role"] == "user"} == {d["user_message_id"] for d in done}
    by_id = {m["id"]: m for m in messages}
    for d in done:
        assert by_id[d["message_id"]]["parent_id"] == d["user_message_id"]
        assert order.index(d["user_message_id"]) < order.index(d["message_id"])


# --------------------------------------------------------------------------- a database that fails


def fail_inserts(store, when: str) -> Callable[[], None]:
    """Make the database itself refuse inserts into ``messages`` where ``when`` (SQL over NEW) holds,
    with the error 'injected database failure'; returns the undo."""
    with store.engine.begin() as conn:
        if store.is_sqlite:
            conn.exec_driver_sql(f"CREATE TRIGGER cf_fail BEFORE INSERT ON messages WHEN {when} "
                                 "BEGIN SELECT RAISE(ABORT, 'injected database failure'); END")
        else:
            conn.exec_driver_sql(f"CREATE FUNCTION cf_fail() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN IF {when} "
                                 "THEN RAISE EXCEPTION 'injected database failure'; END IF; RETURN NEW; END $$")
            conn.exec_driver_sql("CREATE TRIGGER cf_fail BEFORE INSERT ON messages FOR EACH ROW "
                                 "EXECUTE FUNCTION cf_fail()")

    def undo() -> None:
        with store.engine.begin() as conn:
            conn.exec_driver_sql("DROP TRIGGER cf_fail" + ("" if store.is_sqlite else " ON messages"))
            if not store.is_sqlite:
                conn.exec_driver_sql("DROP FUNCTION cf_fail()")
    return undo


def test_database_failure_ends_the_stream(tmp_path, db_url, caplog):
    app, _ = build_app(tmp_path, db_url=db_url)
    caplog.set_level(logging.ERROR, logger="chatforge.serve.web")
    with live_server(app) as base, logged_in(base) as http:
        state = app.state.cf
        never_stop(state)  # every answer runs to max_tokens: there is always text that could be lost
        conv_id = http.post("/api/conversations", json={}).json()["id"]

        def answer(content: str) -> tuple[str, list[str], dict]:
            caplog.clear()
            events = send(http, conv_id, content, temperature=1.0)
            assert events is not None, "the stream hung: no done event"
            assert events[-1].get("done") is True, events
            return ("".join(e.get("delta", "") for e in events), [e["error"] for e in events if "error" in e],
                    events[-1])

        # 1. the answer's insert fails once: stored on the second try, marked finish_reason "error"
        undo = fail_inserts(state.store, "NEW.role = 'assistant' AND COALESCE(NEW.finish_reason, '') <> 'error'")
        text, errors, done = answer("first")
        undo()
        assert text and done["finish_reason"] == "error" and done.get("message_id"), done
        assert len(errors) == 1 and "storing the answer failed" in errors[0], errors
        assert "injected database failure" in errors[0] and "second try" in errors[0]
        assert "INSERT" not in errors[0]  # neither the SQL nor its parameters reach the client
        assert [r.getMessage() for r in caplog.records if "storing the answer failed" in r.getMessage()] \
            and len(caplog.records) == 1
        stored = {m["id"]: m for m in http.get(f"/api/conversations/{conv_id}").json()["messages"]}
        assert stored[done["message_id"]]["content"] == service.message_content("assistant", text)
        assert stored[done["message_id"]]["finish_reason"] == "error"

        # 2. every insert of an answer fails: the stream still ends, the answer was streamed, not saved
        undo = fail_inserts(state.store, "NEW.role = 'assistant'")
        text, errors, done = answer("second")
        undo()
        assert text and done["finish_reason"] == "error" and "message_id" not in done and done["user_message_id"]
        assert len(errors) == 1 and "storing the answer failed" in errors[0] and "not saved" in errors[0]
        assert len(caplog.records) == 1 and "injected database failure" in caplog.records[0].getMessage()
        stored = {m["id"]: m for m in http.get(f"/api/conversations/{conv_id}").json()["messages"]}
        assert done["user_message_id"] in stored and max(stored) == done["user_message_id"]

        # 3. the question cannot be stored: its answer still streams, nothing is saved, the stream ends
        undo = fail_inserts(state.store, "NEW.role = 'user'")
        text, errors, done = answer("third")
        undo()
        assert text and done["user_message_id"] is None and "message_id" not in done
        assert len(errors) == 1 and "storing your message failed" in errors[0], errors
        assert len(caplog.records) == 1
        assert len(http.get(f"/api/conversations/{conv_id}").json()["messages"]) == len(stored)

        # the server is unharmed: the next message is answered and stored normally
        text, errors, done = answer("fourth")
        assert not errors and done.get("message_id") and done["finish_reason"] == "length"
    app.state.cf.store.close()


# --------------------------------------------------------------------------- unstorable characters


def test_unstorable_characters_are_refused_before_generating(tmp_path, db_url):
    app, _ = build_app(tmp_path, db_url=db_url)
    with live_server(app) as base, logged_in(base) as http:
        engine = app.state.cf.models["tiny-a"].engine
        conv_id = http.post("/api/conversations", json={}).json()["id"]
        for content in ("a\u0000b", "x\ud800y"):  # as JSON escapes, the way a browser sends them
            r = http.post(f"/api/conversations/{conv_id}/messages", content=json.dumps({"content": content}),
                          headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and r.json()["field"] == "content", r.text
            assert "the database cannot store it" in r.json()["error"]
        r = http.post("/api/conversations", json={"system": "be\u0000 brief"})
        assert r.status_code == 422 and r.json()["field"] == "system"
        events = send(http, conv_id, "hello", temperature=0)  # greedy: this untrained model writes NULs
        assert events is not None and events[-1].get("message_id"), events
        r = http.post(f"/api/messages/{events[-1]['message_id']}/feedback", json={"thumb": 1, "comment": "\u0000"})
        assert r.status_code == 422 and r.json()["field"] == "comment"
        messages = http.get(f"/api/conversations/{conv_id}").json()["messages"]
        assert [m["role"] for m in messages] == ["user", "assistant"]  # nothing of the refused ones
        assert "\u0000" not in messages[1]["content"] and messages[1]["thumb"] is None
        assert engine.stats()["requests_finished"] == 1  # the refused messages never reached the engine
    app.state.cf.store.close()


# --------------------------------------------------------------------------- the password


def serve_output(model: Path, db_url: str, wait_for: str | None, timeout: float = 180) -> tuple[int | None, str]:
    """Run ``python -m chatforge.serve.cli MODEL --db URL``; return its exit code (None: stopped by us
    once ``wait_for`` appeared) and everything it printed on stdout and stderr."""
    env = {**os.environ, "CHATFORGE_ADMIN_PASSWORD": ADMIN_PASSWORD,
           "PYTHONPATH": os.pathsep.join([str(Path(chatforge.__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "chatforge.serve.cli", str(model), "--db", db_url, "--port", str(free_port()),
           "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    stopped = False
    try:
        for line in proc.stdout:  # to the end of the output when it exits by itself
            lines.append(line)
            if wait_for and wait_for in line:
                stopped = True
                proc.terminate()
                break
            if time.monotonic() > deadline:
                break
    finally:
        if proc.poll() is None and not stopped:
            proc.kill()
        rest, _ = proc.communicate(timeout=60)
    return None if stopped else proc.returncode, "".join(lines) + (rest or "")


def test_serve_error_output_hides_the_password(tmp_path):
    model = save_tiny_model(tmp_path / "model")
    secret = "pw-for-grep-7f3c9a"
    code, out = serve_output(model, f"postgresql+psycopg://chatforge:{secret}@127.0.0.1:1/nothing", wait_for=None)
    assert code == 2 and "error: database postgresql+psycopg://chatforge:***@127.0.0.1:1/nothing" in out, out
    assert secret not in out


def test_serve_startup_output_hides_the_password(tmp_path):
    url = server_url()
    if url is None:
        skip_or_fail(MISSING)
    secret = make_url(url).password
    if not secret:
        skip_or_fail(f"the PostgreSQL URL in the environment has no password to look for in the output: {url}")
    model = save_tiny_model(tmp_path / "model")
    with fresh_database("postgresql", tmp_path) as db_url:
        code, out = serve_output(model, db_url, wait_for="web app: open")
    assert code is None and "web app: open" in out and ":***@" in out, out
    assert str(secret) not in out
