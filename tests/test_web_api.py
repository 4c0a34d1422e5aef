"""The web app's /api router against the real app: tiny models, a temp SQLite database.

Covers sessions and roles, chat streaming (stored with the model's version, the right
history rendered), feedback, regenerate, the whole admin -> reviewer -> export loop,
labelling, and the guards: CSRF (JSON-only POSTs), XSS/SQL-shaped data stored and
returned verbatim, over-long prompts, path traversal, a client that leaves mid-stream.
"""

from __future__ import annotations

import json
import time
from itertools import combinations

import httpx
import pytest
from db_backends import BACKENDS, fresh_database
from fastapi.testclient import TestClient
from serve_fixtures import (
    ADMIN_PASSWORD,
    CONTEXT,
    PASSWORD,
    add_users,
    build_app,
    live_server,
    never_stop,
    read_sse,
    slow_down,
)

from chatforge.serve.engine import SamplingParams
from chatforge.serve.limits import FailureThrottle
from chatforge.serve.web import current_branch
from chatforge.store import service

XSS = '<script>alert("xss")</script><img src=x onerror=alert(1)>'
SQLI = "Robert'); DROP TABLE users; -- \" OR 1=1 --"


@pytest.fixture(scope="module", params=BACKENDS)
def served(request, tmp_path_factory):
    """One app per backend for the module (two tiny models, ids tiny-a and tiny-b); tests use their
    own data. Every test using it runs on SQLite and on PostgreSQL (tests/db_backends.py)."""
    tmp = tmp_path_factory.mktemp("web")
    with fresh_database(request.param, tmp) as db_url:
        app, settings = build_app(tmp, n_models=2, db_url=db_url)
        with TestClient(app) as client:
            state = app.state.cf
            add_users(state)
            yield client, state
        state.store.close()


@pytest.fixture
def client(served):
    client, _ = served
    client.cookies.clear()
    yield client
    client.cookies.clear()


@pytest.fixture
def state(served):
    return served[1]


def login(client: TestClient, username: str, password: str = PASSWORD) -> dict:
    client.cookies.clear()
    r = client.post("/api/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return r.json()


def as_admin(client: TestClient) -> dict:
    return login(client, "admin", ADMIN_PASSWORD)


def chat(client: TestClient, conv_id: int, content: str | None = None, **params) -> list[dict]:
    """Send a message (or regenerate with content=None) and return the stream's events."""
    url = f"/api/conversations/{conv_id}/" + ("messages" if content is not None else "regenerate")
    body = {"content": content, **params} if content is not None else params
    with client.stream("POST", url, json=body) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return read_sse(r.iter_lines())


def answer_of(events: list[dict]) -> tuple[str, dict]:
    assert not [e for e in events if "error" in e], events
    done = events[-1]
    assert done["done"] is True and all("delta" in e for e in events[:-1]), events
    return "".join(e["delta"] for e in events[:-1]), done


def greedy(state, model_id: str, messages: list[dict], max_tokens: int) -> str:
    """What the model answers at temperature 0, straight from its engine."""
    engine = state.models[model_id].engine
    return engine.chat(messages, SamplingParams(max_tokens=max_tokens, temperature=0.0)).wait(timeout=60)


# --------------------------------------------------------------------------- pages, sessions, roles


def test_pages_static_and_security_headers(client):
    r = client.get("/", follow_redirects=False)
    assert r.status_code in (302, 303, 307) and r.headers["location"] == "/chat"
    for page in ("login", "chat", "review", "rank", "label", "admin"):
        r = client.get(f"/{page}")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html"), page
        assert "script-src 'self'" in r.headers["content-security-policy"]
        assert r.headers["x-content-type-options"] == "nosniff"
        assert f'src="/static/{page}.js"' in r.text
    assert "content-security-policy" not in client.get("/health").headers  # only the web app's own paths
    css = client.get("/static/app.css")
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]
    assert client.get("/static/common.js").status_code == 200


@pytest.mark.parametrize("path", ["/static/../web.py", "/static/%2e%2e/web.py", "/static/..%2fweb.py",
                                  "/static/%2e%2e%2f%2e%2e%2fengine.py", "/static//etc/passwd",
                                  "/static/..%5cweb.py"])
def test_static_path_traversal_refused(client, path):
    r = client.get(path)
    assert r.status_code in (400, 404), (path, r.status_code)
    assert "def mount_web" not in r.text and "root:" not in r.text


def test_login_me_logout(client):
    r = client.post("/api/login", json={"username": "rev1", "password": "wrong"})
    assert r.status_code == 401 and "wrong username or password" in r.json()["error"]
    assert client.post("/api/login", json={"username": "nobody", "password": "x"}).status_code == 401
    assert client.post("/api/login", json={"username": "rev1"}).json()["field"] == "password"

    r = client.post("/api/login", json={"username": "rev1", "password": PASSWORD})
    assert r.status_code == 200 and r.json() == {"username": "rev1", "role": "reviewer", "next": "/chat"}
    cookie = r.headers["set-cookie"]
    assert cookie.startswith("cf_session=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain http in tests: a Secure cookie would never be sent back
    token = client.cookies["cf_session"]
    me = client.get("/api/me").json()
    assert me["username"] == "rev1" and me["role"] == "reviewer"

    assert client.post("/api/logout", json={}).status_code == 200
    assert client.get("/api/me").status_code == 401
    client.cookies.set("cf_session", token)  # the old token is dead on the server, not just forgotten
    assert client.get("/api/me").status_code == 401


def test_logout_everywhere_ends_every_session_of_the_user(served):
    client, state = served
    with TestClient(client.app) as other, TestClient(client.app) as third:  # three browsers
        for c, user in ((client, "rev1"), (other, "rev1"), (third, "rev2")):
            c.cookies.clear()
            assert c.post("/api/login", json={"username": user, "password": PASSWORD}).status_code == 200
        r = client.post("/api/logout/everywhere", json={})
        assert r.status_code == 200 and r.json()["sessions_ended"] >= 2
        assert client.get("/api/me").status_code == 401
        assert other.get("/api/me").status_code == 401  # rev1's other browser is logged out too
        assert third.get("/api/me").json()["username"] == "rev2"  # other users are not
    client.cookies.clear()
    assert client.post("/api/logout/everywhere", json={}).status_code == 401


@pytest.mark.parametrize("target,expected", [
    ("/review?kind=rank", "/review?kind=rank"), ("/chat#x", "/chat#x"), (None, "/chat"), (7, "/chat"),
    ("//evil.example/phish", "/chat"), ("/\t/evil.example/phish", "/chat"), ("/\n/evil.example", "/chat"),
    ("/\\evil.example", "/chat"), ("\\/evil.example", "/chat"), (" //evil.example", "/chat"),
    ("\x00//evil.example", "/chat"), ("https://evil.example/", "/chat"), ("javascript:alert(1)", "/chat"),
    ("evil.example", "/chat"), ("/a\tb", "/ab"), ("/x\x01", "/x"), ("/x\x01y", "/chat"),
])
def test_login_next_is_checked_on_the_server(client, target, expected):
    body = {"username": "rev2", "password": PASSWORD, **({"next": target} if target is not None else {})}
    r = client.post("/api/login", json=body)
    assert r.status_code == 200 and r.json()["next"] == expected


def test_failed_logins_back_off(tmp_path, db_url):
    app, _ = build_app(tmp_path, db_url=db_url)
    with TestClient(app) as client:
        state = app.state.cf
        add_users(state)
        free = state.login_throttle.free
        for _ in range(free):
            assert client.post("/api/login", json={"username": "rev1", "password": "guess"}).status_code == 401
        r = client.post("/api/login", json={"username": "rev1", "password": PASSWORD})
        assert r.status_code == 429 and "too many failed logins for 'rev1'" in r.json()["error"]
        assert int(r.headers["retry-after"]) >= 1
        assert "cf_session" not in client.cookies  # from this address, even the right password waits its turn
        # another account from the same address is not slowed down
        assert client.post("/api/login", json={"username": "rev2", "password": PASSWORD}).status_code == 200


def test_failure_throttle_backs_off_and_forgets():
    throttle = FailureThrottle(free=2, base=0.2, cap=0.4, forget=1.0)
    assert [throttle.attempt("a") for _ in range(2)] == [0.0, 0.0]  # free attempts, each counted at once
    assert 0 < throttle.attempt("a") <= 0.2  # the third must wait base seconds after the second
    assert throttle.failures("a") == 2  # a refused attempt is not counted
    assert throttle.attempt("b") == 0.0  # other keys are not affected
    time.sleep(0.25)
    assert throttle.attempt("a") == 0.0  # waited: allowed, and counted (3 failures)
    assert 0.2 < throttle.attempt("a") <= 0.4  # the delay doubled, up to the cap
    throttle.release("a")  # an attempt that was right after all: uncount it, keep the earlier failures
    assert throttle.failures("a") == 2
    throttle.succeeded("b")
    assert throttle.failures("b") == 0 and throttle.failures("a") == 2
    throttle.succeeded("a")
    assert throttle.attempt("a") == 0.0
    time.sleep(1.05)
    assert throttle.failures("a") == 1 and throttle.attempt("a") == 0.0  # forgotten after `forget` idle


@pytest.mark.parametrize("method,path", [
    ("GET", "/api/me"), ("GET", "/api/models"), ("GET", "/api/conversations"), ("GET", "/api/conversations/1"),
    ("POST", "/api/conversations"), ("POST", "/api/conversations/1/messages"), ("GET", "/api/review/next"),
    ("POST", "/api/review/rate"), ("GET", "/api/label/next"), ("GET", "/api/admin/users"),
    ("POST", "/api/admin/datasets"), ("GET", "/api/admin/export?kind=sft"), ("GET", "/api/admin/progress"),
])
def test_unauthenticated_is_401(client, method, path):
    r = client.request(method, path, json={} if method == "POST" else None)
    assert r.status_code == 401, (path, r.text)
    assert "not logged in" in r.json()["error"]


def test_forged_session_cookie_is_401(client):
    client.cookies.set("cf_session", "x" * 43)
    assert client.get("/api/me").status_code == 401


@pytest.mark.parametrize("user,method,path,status", [
    ("ann1", "GET", "/api/review/next?kind=rate", 403),
    ("ann1", "POST", "/api/review/rank", 403),
    ("rev1", "GET", "/api/label/next", 403),
    ("rev1", "POST", "/api/label", 403),
    ("rev1", "GET", "/api/admin/users", 403),
    ("ann1", "POST", "/api/admin/users", 403),
    ("rev1", "POST", "/api/admin/assign", 403),
    ("rev1", "GET", "/api/admin/export?kind=preferences", 403),
    ("ann1", "GET", "/api/admin/progress", 403),
    ("admin", "GET", "/api/review/next?kind=rank", 200),
    ("admin", "GET", "/api/label/next", 200),
    ("ann1", "GET", "/api/conversations", 200),
])
def test_roles(client, user, method, path, status):
    login(client, user, ADMIN_PASSWORD if user == "admin" else PASSWORD)
    r = client.request(method, path, json={} if method == "POST" else None)
    assert r.status_code == status, (user, path, r.text)
    if status == 403:
        assert "needs the role" in r.json()["error"]


def test_post_must_be_json_csrf_guard(client):
    # a cross-site form can only send these content types: refused before anything happens
    r = client.post("/api/login", data={"username": "rev1", "password": PASSWORD})
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = client.post("/api/login", content=json.dumps({"username": "rev1", "password": PASSWORD}),
                    headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "cf_session" not in r.headers.get("set-cookie", "")
    login(client, "rev1")
    before = client.get("/api/conversations").json()["conversations"]
    r = client.post("/api/conversations", content="model=tiny-a",
                    headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    assert client.post("/api/logout", content="", headers={"Content-Type": "text/plain"}).status_code == 415
    assert client.get("/api/conversations").json()["conversations"] == before  # nothing created, still logged in
    r = client.post("/api/conversations", content="{not json", headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    r = client.post("/api/conversations", json=[1, 2])
    assert r.status_code == 400 and "JSON object" in r.json()["error"]


def test_models(client, state):
    login(client, "rev1")
    body = client.get("/api/models").json()
    assert body["default"] == "tiny-a"
    assert [m["id"] for m in body["models"]] == ["tiny-a", "tiny-b"]
    for m in body["models"]:
        assert m["version"] == state.models[m["id"]].version and len(m["version"]) == 12


# --------------------------------------------------------------------------- chat


def test_chat_stream_stores_messages_with_model_version(client, state):
    login(client, "rev1")
    system = "You are a terse support bot."
    conv_id = client.post("/api/conversations", json={"model": "tiny-b", "system": system}).json()["id"]
    events = chat(client, conv_id, "Where is my parcel?", temperature=0, max_tokens=24)
    text, done = answer_of(events)
    assert done["finish_reason"] in ("stop", "length")
    assert len(events) > 2  # streamed in pieces, not one blob

    conv = client.get(f"/api/conversations/{conv_id}").json()
    assert conv["model_id"] == "tiny-b" and conv["system"] == system
    user, answer = conv["messages"][-2:]
    assert user == {**user, "id": done["user_message_id"], "role": "user", "content": "Where is my parcel?"}
    # stored as streamed, less the characters no database can store (the untrained model writes NULs)
    assert answer["id"] == done["message_id"] and answer["role"] == "assistant"
    assert answer["content"] == service.message_content("assistant", text) == text.replace("\x00", "")
    assert answer["model_id"] == "tiny-b" and answer["model_version"] == state.models["tiny-b"].version
    assert answer["parent_id"] == user["id"]
    # the model saw the system prompt and the question: the same greedy answer straight from the engine
    expected = [{"role": "system", "content": system}, {"role": "user", "content": "Where is my parcel?"}]
    assert text == greedy(state, "tiny-b", expected, 24)

    # the second turn is rendered with the whole history of the branch
    text2, done2 = answer_of(chat(client, conv_id, "And when?", temperature=0, max_tokens=16))
    conv = client.get(f"/api/conversations/{conv_id}").json()
    history = expected + [{"role": "assistant", "content": answer["content"]}, {"role": "user", "content": "And when?"}]
    assert text2 == greedy(state, "tiny-b", history, 16)
    by_id = {m["id"]: m for m in conv["messages"]}
    assert by_id[done2["user_message_id"]]["parent_id"] == done["message_id"]
    assert [c["id"] for c in client.get("/api/conversations").json()["conversations"]].count(conv_id) == 1


def test_regenerate_makes_a_sibling_and_continues_from_it(client, state):
    login(client, "rev2")
    conv_id = client.post("/api/conversations", json={}).json()["id"]
    assert client.get(f"/api/conversations/{conv_id}").json()["model_id"] == "tiny-a"  # the default
    r = client.post(f"/api/conversations/{conv_id}/regenerate", json={})
    assert r.status_code == 409 and "no user message" in r.json()["error"]

    first, done1 = answer_of(chat(client, conv_id, "Hello", max_tokens=12))
    second, done2 = answer_of(chat(client, conv_id, None, max_tokens=12, temperature=1.5))
    assert done2["user_message_id"] == done1["user_message_id"] and done2["message_id"] != done1["message_id"]
    msgs = client.get(f"/api/conversations/{conv_id}").json()["messages"]
    answers = [m for m in msgs if m["role"] == "assistant"]
    assert [a["id"] for a in answers] == [done1["message_id"], done2["message_id"]]
    assert {a["parent_id"] for a in answers} == {done1["user_message_id"]}  # siblings
    assert [m["id"] for m in current_branch(msgs)] == [done1["user_message_id"], done2["message_id"]]
    # the next turn follows the regenerated answer, not the first one
    _, done3 = answer_of(chat(client, conv_id, "Thanks", max_tokens=4))
    msgs = client.get(f"/api/conversations/{conv_id}").json()["messages"]
    assert {m["id"]: m for m in msgs}[done3["user_message_id"]]["parent_id"] == done2["message_id"]


def test_thumbs_and_comment(client, state):
    login(client, "rev1")
    conv_id = client.post("/api/conversations", json={}).json()["id"]
    _, done = answer_of(chat(client, conv_id, "Refund please", max_tokens=8))
    mid = done["message_id"]
    r = client.post(f"/api/messages/{mid}/feedback", json={"thumb": 1, "comment": SQLI})
    assert r.status_code == 200, r.text
    msg = next(m for m in client.get(f"/api/conversations/{conv_id}").json()["messages"] if m["id"] == mid)
    assert msg["thumb"] == 1 and msg["comment"] == SQLI  # stored verbatim, nothing dropped
    assert client.post(f"/api/messages/{mid}/feedback", json={"thumb": -1}).status_code == 200
    msg = next(m for m in client.get(f"/api/conversations/{conv_id}").json()["messages"] if m["id"] == mid)
    assert msg["thumb"] == -1

    r = client.post(f"/api/messages/{mid}/feedback", json={"thumb": 2})
    assert r.status_code == 422 and r.json()["field"] == "thumb"
    r = client.post(f"/api/messages/{mid}/feedback", json={"thumb": True})
    assert r.status_code == 422 and r.json()["field"] == "thumb"
    assert client.post("/api/messages/99999999/feedback", json={"thumb": 1}).status_code == 404
    assert len(service.list_users(state.store)) >= 5  # the SQL-shaped comment dropped nothing


def test_conversations_are_private(client):
    login(client, "rev1")
    conv_id = client.post("/api/conversations", json={}).json()["id"]
    _, done = answer_of(chat(client, conv_id, "secret order 123", max_tokens=4))
    login(client, "ann1")
    # someone else's conversation answers exactly like one that does not exist: ids tell nothing
    theirs, missing = client.get(f"/api/conversations/{conv_id}"), client.get("/api/conversations/99999999")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"] == f"no conversation with id {conv_id}"
    assert conv_id not in [c["id"] for c in client.get("/api/conversations").json()["conversations"]]
    r = client.post(f"/api/conversations/{conv_id}/messages", json={"content": "hi"})
    assert r.status_code == 404
    r = client.post(f"/api/messages/{done['message_id']}/feedback", json={"thumb": 1})
    assert r.status_code == 404 and r.json()["error"] == f"no message with id {done['message_id']}"
    r = client.get("/api/conversations/abc")
    assert r.status_code == 422 and r.json()["field"] == "conv_id"


def test_chat_input_validation_and_overlong_prompt(client, state):
    login(client, "rev1")
    conv_id = client.post("/api/conversations", json={"system": "be brief"}).json()["id"]
    before = client.get(f"/api/conversations/{conv_id}").json()["messages"]
    r = client.post(f"/api/conversations/{conv_id}/messages", json={"content": "word " * CONTEXT})
    assert r.status_code == 400
    assert "too long" in r.json()["error"] and f"{CONTEXT}" in r.json()["error"]
    r = client.post(f"/api/conversations/{conv_id}/messages", json={"content": "x" * 40_000})
    assert r.status_code == 422 and r.json()["field"] == "content"
    for body, field in [({"content": ""}, "content"), ({"content": 5}, "content"), ({}, "content"),
                        ({"content": "hi", "max_tokens": CONTEXT + 1}, "max_tokens"),
                        ({"content": "hi", "max_tokens": 0}, "max_tokens"),
                        ({"content": "hi", "temperature": -1}, "temperature"),
                        ({"content": "hi", "temperature": "hot"}, "temperature")]:
        r = client.post(f"/api/conversations/{conv_id}/messages", json=body)
        assert r.status_code == 422 and r.json()["field"] == field, (body, r.text)
    assert client.get(f"/api/conversations/{conv_id}").json()["messages"] == before  # nothing stored
    r = client.post("/api/conversations", json={"model": "gpt-17"})
    assert r.status_code == 422 and r.json()["field"] == "model" and "tiny-a" in r.json()["error"]


def test_sql_and_script_shaped_text_stored_verbatim(client, state):
    login(client, "rev2")
    conv_id = client.post("/api/conversations", json={"system": XSS}).json()["id"]
    _, done = answer_of(chat(client, conv_id, SQLI, max_tokens=4))
    conv = client.get(f"/api/conversations/{conv_id}").json()
    assert conv["system"] == XSS
    assert next(m for m in conv["messages"] if m["id"] == done["user_message_id"])["content"] == SQLI
    assert conv["title"].startswith("Robert'); DROP TABLE users;")
    assert len(service.list_users(state.store)) >= 5


# --------------------------------------------------------------------------- admin -> review -> export


def import_jsonl(client: TestClient, name: str, kind: str, rows: list[dict]) -> dict:
    r = client.post("/api/admin/datasets", json={"name": name, "kind": kind,
                                                 "jsonl": "\n".join(json.dumps(x) for x in rows) + "\n"})
    assert r.status_code == 200, r.text
    return r.json()


def test_admin_import_errors_name_the_line(client):
    as_admin(client)
    r = client.post("/api/admin/datasets", json={"name": "bad", "kind": "prompts",
                                                 "jsonl": '{"prompt": "ok"}\n{"prompt": oops}\n'})
    assert r.status_code == 422 and r.json()["field"] == "jsonl" and "line 2" in r.json()["error"]
    r = client.post("/api/admin/datasets", json={"name": "bad", "kind": "prompts",
                                                 "jsonl": '{"prompt": "ok"}\n\n{"nope": 1}\n'})
    assert r.status_code == 422 and r.json()["field"].startswith("rows[1]") and "jsonl line 3" in r.json()["error"]
    r = client.post("/api/admin/datasets", json={"name": "bad", "kind": "pictures", "jsonl": '{"text": "a"}'})
    assert r.status_code == 422 and r.json()["field"] == "kind"
    r = client.post("/api/admin/datasets", json={"name": "bad", "kind": "items", "jsonl": "  \n"})
    assert r.status_code == 422 and r.json()["field"] == "jsonl"
    assert "bad" not in [d["name"] for d in client.get("/api/admin/datasets").json()["datasets"]]


def test_admin_users(client):
    as_admin(client)
    r = client.post("/api/admin/users", json={"username": "newbie", "password": "pw-newbie-1", "role": "annotator"})
    assert r.status_code == 200 and r.json()["role"] == "annotator"
    assert client.post("/api/admin/users", json={"username": "newbie", "password": "x" * 12,
                                                 "role": "annotator"}).status_code == 409
    r = client.post("/api/admin/users", json={"username": "x", "password": "x" * 12, "role": "wizard"})
    assert r.status_code == 422 and r.json()["field"] == "role"
    r = client.post("/api/admin/users/newbie/role", json={"role": "reviewer"})
    assert r.status_code == 200 and r.json()["role"] == "reviewer"
    users = {u["username"]: u["role"] for u in client.get("/api/admin/users").json()["users"]}
    assert users["newbie"] == "reviewer" and users["admin"] == "admin"
    login(client, "newbie", "pw-newbie-1")
    assert client.get("/api/review/next?kind=rate").status_code == 200


def test_full_admin_flow_rate_rank_agreement_export(client, state):
    as_admin(client)
    prompts = [{"prompt": "Where is my parcel?"},
               {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": SQLI}]},
               {"prompt": XSS}]
    ds = import_jsonl(client, "support-prompts", "prompts", prompts)
    assert ds["count"] == 3
    # generate: 2 models x 2 each, all submitted at once so the engine batches them
    r = client.post("/api/admin/responses", json={"dataset_id": ds["id"], "models": ["tiny-a", "tiny-b"],
                                                  "per_model": 2, "max_tokens": 16})
    assert r.status_code == 200, r.text
    assert r.json() == {"generated": {"tiny-a": 6, "tiny-b": 6}, "skipped": []}
    r = client.post("/api/admin/responses", json={"dataset_id": ds["id"], "models": ["tiny-a", "tiny-b"],
                                                  "per_model": 2})
    assert r.json()["generated"] == {"tiny-a": 0, "tiny-b": 0}  # nothing missing any more
    r = client.post("/api/admin/responses", json={"dataset_id": ds["id"], "models": ["nope"], "per_model": 1})
    assert r.status_code == 422 and r.json()["field"] == "models"

    r = client.post("/api/admin/assign", json={"dataset_id": ds["id"], "kind": "rate",
                                               "usernames": ["rev1", "rev2"], "overlap": 2})
    assert r.status_code == 200 and r.json()["assigned"] == 12 * 2
    r = client.post("/api/admin/assign", json={"dataset_id": ds["id"], "kind": "rank",
                                               "usernames": ["rev1", "rev2"], "overlap": 2})
    assert r.status_code == 200 and r.json()["assigned"] == 3 * 2
    r = client.post("/api/admin/assign", json={"dataset_id": ds["id"], "kind": "rate",
                                               "usernames": ["ghost"], "overlap": 1})
    assert r.status_code in (404, 422)

    submitted_orders: dict[str, list[tuple[int, list[int]]]] = {}
    for user in ("rev1", "rev2"):
        login(client, user)
        seen = set()
        for n in range(12):
            item = client.get("/api/review/next?kind=rate").json()
            assert "fluency" in item["guidelines"]["aspects"] and item["guidelines"]["text"]
            assert item["kind"] == "rate" and item["progress"] == {"done": n, "total": 12}
            assert "model_id" not in json.dumps(item["response"])  # blind review
            seen.add(item["response"]["id"])
            if n == 0:
                bad = client.post("/api/review/rate", json={"assignment_id": item["assignment_id"], "fluency": 6,
                                                            "coherence": 3, "relevance": 3, "appropriateness": 3})
                assert bad.status_code == 422 and bad.json()["field"] == "fluency"
                missing = client.post("/api/review/rate", json={"assignment_id": item["assignment_id"]})
                assert missing.status_code == 422
            score = 1 + (item["response"]["id"] + (n % 2 if user == "rev2" else 0)) % 5
            r = client.post("/api/review/rate", json={"assignment_id": item["assignment_id"], "fluency": score,
                                                      "coherence": score, "relevance": 5 - score + 1,
                                                      "appropriateness": 4, "comment": f"{user} #{n}"})
            assert r.status_code == 200, r.text
            if n == 0:
                again = client.post("/api/review/rate", json={"assignment_id": item["assignment_id"], "fluency": 1,
                                                              "coherence": 1, "relevance": 1, "appropriateness": 1})
                assert again.status_code == 409
        assert len(seen) == 12
        assert client.get("/api/review/next?kind=rate").json()["done"] is True

        submitted_orders[user] = []
        for n in range(3):
            item = client.get("/api/review/next?kind=rank").json()
            ids = [x["id"] for x in item["responses"]]
            assert len(ids) == 4 and item["progress"]["done"] == n
            order = sorted(ids, reverse=user == "rev2")  # rev2 disagrees with rev1 on every pair
            r = client.post("/api/review/rank", json={"assignment_id": item["assignment_id"], "order": order[:3]})
            assert r.status_code == 422
            r = client.post("/api/review/rank", json={"assignment_id": item["assignment_id"], "order": order})
            assert r.status_code == 200, r.text
            submitted_orders[user].append((item["prompt"]["id"], order))
        assert client.get("/api/review/next?kind=rank").json()["done"] is True

    # reviewers only ever see (and may only submit) their own assignments
    login(client, "rev1")
    rev1_rate = {a["id"] for a in _assignments(state, "rev1")}
    rev2_rate = {a["id"] for a in _assignments(state, "rev2")}
    assert rev1_rate and rev2_rate and not rev1_rate & rev2_rate
    r = client.post("/api/review/rank", json={"assignment_id": min(rev2_rate), "order": [1, 2]})
    assert r.status_code in (404, 409, 422)
    r = client.post("/api/review/rate", json={"assignment_id": min(rev2_rate), "fluency": 1, "coherence": 1,
                                              "relevance": 1, "appropriateness": 1})
    assert r.status_code == 404 and r.json()["error"] == f"no assignment with id {min(rev2_rate)}"

    as_admin(client)
    body = client.get("/api/admin/progress").json()
    rows = [p for p in body["progress"] if p["dataset_id"] == ds["id"]]
    assert {(p["username"], p["kind"]): (p["done"], p["total"]) for p in rows} == {
        ("rev1", "rate"): (12, 12), ("rev2", "rate"): (12, 12), ("rev1", "rank"): (3, 3), ("rev2", "rank"): (3, 3)}
    ag = body["agreement"][str(ds["id"])]
    assert set(ag["rate"]) == set(service.RATING_ASPECTS)
    assert ag["rank"]["pairwise_agreement"] == 0.0  # rev2 reversed every order of rev1

    # preferences: every pair (better, worse) each ranking implies, and nothing else
    exported = _export(client, "preferences")
    expected = sorted((user, _response_text(state, a), _response_text(state, b))
                      for user, orders in submitted_orders.items()
                      for _, order in orders for a, b in combinations(order, 2))
    got = sorted((row["meta"]["user"], row["chosen"][-1]["content"], row["rejected"][-1]["content"])
                 for row in exported if row["meta"]["source"] == "ranking")
    assert got == expected and len(got) == 2 * 3 * 6
    prompts_seen = {json.dumps(row["prompt"]) for row in exported if row["meta"]["source"] == "ranking"}
    assert any(SQLI in json.loads(p)[-1]["content"] for p in prompts_seen)  # verbatim
    assert any(XSS in json.loads(p)[-1]["content"] for p in prompts_seen)
    as_admin(client)
    ratings = [r for r in _export(client, "ratings") if r["meta"]["dataset"] == "support-prompts"]
    assert len(ratings) == 24 and {r["comment"] for r in ratings} == {f"{u} #{n}" for u in ("rev1", "rev2")
                                                                       for n in range(12)}
    assert {r["meta"]["model"] for r in ratings} == {"tiny-a", "tiny-b"}


def _assignments(state, username: str) -> list[dict]:
    from sqlalchemy import select

    from chatforge.store.models import Assignment, User
    with state.store.session() as s:
        uid = s.scalar(select(User.id).where(User.username == username))
        return [{"id": a.id, "kind": a.kind} for a in s.scalars(select(Assignment).where(Assignment.user_id == uid))]


def _response_text(state, response_id: int) -> str:
    from chatforge.store.models import Response
    with state.store.session() as s:
        return s.get(Response, response_id).text


def _export(client: TestClient, kind: str) -> list[dict]:
    r = client.get(f"/api/admin/export?kind={kind}")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/jsonl")
    assert f'filename="{kind}.jsonl"' in r.headers["content-disposition"]
    return [json.loads(line) for line in r.text.splitlines() if line.strip()]


@pytest.mark.parametrize("kind", ["../../etc/passwd", "preferences/../../x", "..%2F..%2Fetc%2Fpasswd", "",
                                  "PREFERENCES", "sft.jsonl"])
def test_export_kind_is_whitelisted(client, kind):
    as_admin(client)
    r = client.get("/api/admin/export", params={"kind": kind})
    assert r.status_code == 422 and r.json()["field"] == "kind"


def test_label_flow_with_script_item(client, state):
    as_admin(client)
    ds = import_jsonl(client, "tickets", "items", [{"text": XSS, "meta": {"src": "t1"}}, {"text": "Parcel late."},
                                                   {"text": SQLI}])
    fields = [{"name": "sentiment", "type": "choice", "options": ["positive", "neutral", "negative"],
               "required": True},
              {"name": "urgent", "type": "bool", "required": False},
              {"name": "note", "type": "text", "required": False}]
    r = client.post("/api/admin/schemas", json={"name": "triage", "fields": fields})
    assert r.status_code == 200, r.text
    schema_id = r.json()["id"]
    bad = client.post("/api/admin/schemas", json={"name": "broken", "fields": [{"name": "x", "type": "slider"}]})
    assert bad.status_code == 422 and "fields" in bad.json()["field"]
    assert schema_id in [s["id"] for s in client.get("/api/admin/schemas").json()["schemas"]]
    r = client.post("/api/admin/assign", json={"dataset_id": ds["id"], "kind": "label", "usernames": ["ann1", "ann2"],
                                               "overlap": 2, "schema_id": schema_id})
    assert r.status_code == 200 and r.json()["assigned"] == 6

    values = {"ann1": ["negative", "neutral", "negative"], "ann2": ["negative", "neutral", "positive"]}
    for user in ("ann1", "ann2"):
        login(client, user)
        texts = []
        for n in range(3):
            item = client.get("/api/label/next").json()
            assert item["kind"] == "label" and item["schema"]["fields"] == fields
            assert item["progress"] == {"done": n, "total": 3}
            texts.append(item["item"]["text"])
            if n == 0:
                for value, field in [({"sentiment": "angry"}, "sentiment"), ({}, "sentiment"),
                                     ({"sentiment": "neutral", "urgent": "yes"}, "urgent")]:
                    r = client.post("/api/label", json={"assignment_id": item["assignment_id"], "value": value})
                    assert r.status_code == 422 and field in r.json()["field"], (value, r.text)
                r = client.post("/api/label", json={"assignment_id": item["assignment_id"], "value": "neutral"})
                assert r.status_code == 422 and r.json()["field"] == "value"
            value = {"sentiment": values[user][n], "urgent": n == 0, "note": SQLI if n == 2 else ""}
            r = client.post("/api/label", json={"assignment_id": item["assignment_id"], "value": value})
            assert r.status_code == 200, r.text
        assert XSS in texts and SQLI in texts  # returned verbatim: escaping is the page's job (textContent)
        assert client.get("/api/label/next").json()["done"] is True

    as_admin(client)
    ag = client.get("/api/admin/progress").json()["agreement"][str(ds["id"])]
    assert "sentiment" in ag["label"] and "note" not in ag["label"]
    labels = [row for row in _export(client, "labels") if row["text"] in (XSS, SQLI, "Parcel late.")]
    assert len(labels) == 6 and {row["text"] for row in labels} == {XSS, SQLI, "Parcel late."}


def test_review_next_validates_kind(client):
    login(client, "rev1")
    r = client.get("/api/review/next?kind=label")
    assert r.status_code == 422 and r.json()["field"] == "kind"
    r = client.post("/api/review/rank", json={"assignment_id": 1, "order": "1,2"})
    assert r.status_code == 422 and r.json()["field"] == "order"


# --------------------------------------------------------------------------- a client that leaves mid-stream


def test_client_disconnect_cancels_and_stores_partial_answer(tmp_path, db_url):
    app, _ = build_app(tmp_path, n_models=1, db_url=db_url)
    with live_server(app) as base:
        state = app.state.cf
        slow_down(state, 0.02)  # ~50 tokens/s: the answer is far from done when we leave
        never_stop(state)  # ... and would run to max_tokens if it were not cancelled
        with httpx.Client(base_url=base, timeout=30) as http:
            assert http.post("/api/login", json={"username": "admin", "password": ADMIN_PASSWORD}).status_code == 200
            conv_id = http.post("/api/conversations", json={}).json()["id"]
            got = ""
            with http.stream("POST", f"/api/conversations/{conv_id}/messages",
                             json={"content": "Tell me everything", "max_tokens": 200, "temperature": 1.0}) as r:
                for line in r.iter_lines():
                    if line.startswith("data:"):
                        got += json.loads(line[5:])["delta"]
                        if len(got) >= 3:
                            break  # leave: the response is closed mid-stream
            engine = state.models["tiny-a"].engine
            deadline = time.monotonic() + 20
            msgs = []
            while time.monotonic() < deadline:
                msgs = http.get(f"/api/conversations/{conv_id}").json()["messages"]
                if any(m["role"] == "assistant" for m in msgs) and engine.stats()["running"] == 0:
                    break
                time.sleep(0.05)
            answer = [m for m in msgs if m["role"] == "assistant"]
            assert len(answer) == 1, msgs
            # what was generated is kept (at least what we read), and generation stopped early
            assert answer[0]["content"].startswith(got) and answer[0]["model_id"] == "tiny-a"
            assert answer[0]["finish_reason"] == "cancelled"
            stats = engine.stats()
            assert stats["running"] == 0 and stats["tokens_generated"] < 100, stats  # stopped, not run to 200
            assert stats["requests_cancelled"] == 1, stats


def test_engine_failure_is_reported_in_the_stream(tmp_path, db_url):
    app, _ = build_app(tmp_path, db_url=db_url)
    with TestClient(app) as client:
        state = app.state.cf

        def boom(module, args):
            raise RuntimeError("simulated out of memory")

        hook = state.models["tiny-a"].engine.model.blocks[0].register_forward_pre_hook(boom)
        login(client, "admin", ADMIN_PASSWORD)
        conv_id = client.post("/api/conversations", json={}).json()["id"]
        events = chat(client, conv_id, "hello", max_tokens=8)
        assert "simulated out of memory" in events[-2]["error"]
        assert events[-1]["done"] is True and events[-1]["finish_reason"] == "error"
        assert "message_id" not in events[-1]
        msgs = client.get(f"/api/conversations/{conv_id}").json()["messages"]
        assert [m["role"] for m in msgs] == ["user"]  # the question is kept; no empty "answer"
        hook.remove()  # the server recovers: regenerate answers the same question
        text, done = answer_of(chat(client, conv_id, None, max_tokens=8))
        assert done["user_message_id"] == events[-1]["user_message_id"] and "message_id" in done


def test_store_api_keys_open_the_v1_api(tmp_path, db_url):
    app, _ = build_app(tmp_path, api_keys=("sk-operator",), db_url=db_url)
    with TestClient(app) as client:
        state = app.state.cf
        rita = service.create_user(state.store, "rita", PASSWORD, "reviewer")
        key = service.create_api_key(state.store, rita["id"])
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": "Bearer sk-operator"}).status_code == 200
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}x"}).status_code == 401
        assert client.get("/v1/models").status_code == 401
