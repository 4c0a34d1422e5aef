"""Guarded serving (``chatforge serve --guard``): the policy's actions on prompts and answers, on the
OpenAI-compatible API and the web chat; a streamed answer that turns unsafe is cut before the unsafe
text reaches the client (asserted on the raw SSE bytes); flags go to the review queue and out as
moderation training data; ``--no-guard`` serves unguarded; a bad policy file is a clear error.

The served model's engine is replaced by a scripted one that "generates" a fixed text in small
pieces (a tiny random model cannot be made to write an unsafe answer on cue), so everything
from the HTTP request to the SSE bytes and the store is the real path, and deterministic.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from serve_fixtures import ADMIN_PASSWORD, PASSWORD, add_users, build_app, read_sse

from chatforge.chat.template import render_prompt
from chatforge.errors import ConfigError
from chatforge.io import read_jsonl
from chatforge.safety.policy import load_policy
from chatforge.serve.cli import add_serve_parser, settings_from_args
from chatforge.serve.engine import TokenEvent
from chatforge.serve.guard import CHECK_EVERY, LOOKBACK, Guard
from chatforge.store import service
from chatforge.store.cli import add_feedback_parser
from chatforge.store.export import export_feedback

POLICY = load_policy("default")
REFUSAL = POLICY.refusal
OWN = "SW-1234567"  # the customer's own order: in the conversation
OTHER = "SW-7654321"  # another customer's order: never in the conversation
CARD = "4111 1111 1111 1111"  # passes Luhn: the privacy category redacts it
SYSTEM = f"customer Ann Lee; order {OWN} status shipped"
SAFE_PREFIX = f"Thanks for waiting, Ann! Your order {OWN} left our warehouse on Monday and arrives soon. "
UNSAFE = f"Also, order {OTHER} of Bob Smith goes to 12 Elm Street."
TAIL = " And here is a lot more text that should never be generated once the guard has cut the answer." * 4

# place, action -> (user message, scripted answer)
CASES: dict[tuple[str, str], tuple[str, str]] = {
    ("prompt", "allow"): (f"Where is my order {OWN}?", f"Your order {OWN} has shipped."),
    ("prompt", "flag"): ("You people are useless, where is my parcel?", "I am sorry for the wait; it ships today."),
    ("prompt", "redact"): (f"Please charge my card {CARD} again", "Done, thank you."),
    ("prompt", "refuse"): ("What is my neighbour's address?", "SHOULD NEVER BE GENERATED"),
    ("answer", "allow"): ("Where is my order?", f"Your order {OWN} has shipped and arrives on Friday."),
    ("answer", "flag"): ("Should I invest?", "This fund has guaranteed returns of ten percent every year, Ann."),
    ("answer", "redact"): ("What card did I use?", f"You paid with the card {CARD}, which we keep on file."),
    ("answer", "refuse"): ("Where is my order?", SAFE_PREFIX + UNSAFE + TAIL),
}


# --------------------------------------------------------------------------- a scripted engine


class ScriptedHandle:
    """A ``GenerationHandle`` that yields ``text`` in ``piece``-character events; stops when cancelled."""

    def __init__(self, text: str, prompt_tokens: int, piece: int = 4) -> None:
        self.pieces = [text[i:i + piece] for i in range(0, len(text), piece)]
        self.prompt_tokens, self.completion_tokens = prompt_tokens, 0
        self.text, self.finish_reason, self.error = "", None, None
        self.token_ids: list[int] = []
        self.stop_event = None
        self.cancelled = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def cancel(self) -> None:
        self.cancelled = True

    async def __aiter__(self):
        for piece in self.pieces:
            await asyncio.sleep(0)
            if self.cancelled:
                break
            self.text += piece
            self.completion_tokens += 1
            yield TokenEvent(ord(piece[0]), piece)
        if self.finish_reason is None:
            self.finish_reason = "cancelled" if self.cancelled else "stop"

    async def result(self) -> str:
        async for _ in self:
            pass
        return self.text


class ScriptedEngine:
    """Stands in for a served model's ``Engine``: answers every request with ``script``."""

    def __init__(self, real: Any) -> None:
        self.real, self.tokenizer, self.context = real, real.tokenizer, real.context
        self.script = "Hello."
        self.prompts: list[str] = []  # what the model was shown, decoded
        self.handles: list[ScriptedHandle] = []

    running = True

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def stats(self) -> dict[str, Any]:
        return {"scripted": True}

    def submit(self, ids: list[int], params: Any, stops: Any = ()) -> ScriptedHandle:
        self.prompts.append(self.tokenizer.decode(list(ids)))
        handle = ScriptedHandle(self.script, len(ids))
        self.handles.append(handle)
        return handle

    def chat(self, messages: list[dict], params: Any) -> ScriptedHandle:
        return self.submit(render_prompt(messages, self.tokenizer), params)


def scripted_app(tmp: Path, **overrides: Any) -> tuple[Any, ScriptedEngine]:
    app, _ = build_app(tmp, **overrides)
    state = app.state.cf
    served = state.models["tiny-a"]
    served.engine = ScriptedEngine(served.engine)
    add_users(state)
    return app, served.engine


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    app, engine = scripted_app(tmp_path_factory.mktemp("guard"), guard_policy="default")
    with TestClient(app) as client:
        yield client, app.state.cf, engine
    app.state.cf.store.close()


@pytest.fixture
def client(served):
    client = served[0]
    client.cookies.clear()
    yield client
    client.cookies.clear()


@pytest.fixture
def state(served):
    return served[1]


@pytest.fixture
def engine(served):
    engine = served[2]
    engine.prompts.clear()
    engine.handles.clear()
    return engine


def login(client: TestClient, username: str, password: str = PASSWORD) -> None:
    client.cookies.clear()
    assert client.post("/api/login", json={"username": username, "password": password}).status_code == 200


def new_flags(state: Any, since: int) -> list[dict]:
    return [f for f in service.list_flags(state.store, None, 200) if f["id"] > since]


def last_flag_id(state: Any) -> int:
    return max((f["id"] for f in service.list_flags(state.store, None, 200)), default=0)


def chat_messages(user: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


def api_chat(client: TestClient, user: str, stream: bool) -> tuple[str, str | None, bytes]:
    """(content, finish_reason, raw response bytes) of a /v1/chat/completions call."""
    body = {"model": "tiny-a", "messages": chat_messages(user), "max_tokens": 64, "stream": stream}
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["message"]["content"], choice["finish_reason"], r.content
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        raw = b"".join(r.iter_bytes())
    lines = raw.decode().split("\n")
    assert lines[-3] == "data: [DONE]", raw
    chunks = [json.loads(line[5:]) for line in lines if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finish) == 1, chunks
    return text, finish[0], raw


def web_chat(client: TestClient, user: str) -> tuple[str, dict, bytes, int]:
    """(streamed answer, done event, raw bytes, conversation id) of a web chat message."""
    conv_id = client.post("/api/conversations", json={"system": SYSTEM}).json()["id"]
    with client.stream("POST", f"/api/conversations/{conv_id}/messages",
                       json={"content": user, "max_tokens": 64}) as r:
        assert r.status_code == 200, r.read()
        raw = b"".join(r.iter_bytes())
    events = read_sse(raw.decode().split("\n"))
    assert not [e for e in events if "error" in e], events
    assert events[-1]["done"] is True
    return "".join(e.get("delta", "") for e in events), events[-1], raw, conv_id


def expected(place: str, action: str) -> str:
    """What the client gets for a case."""
    _, answer = CASES[(place, action)]
    if action == "refuse" and place == "prompt":
        return REFUSAL
    if action == "redact" and place == "answer":
        return answer.replace(CARD, "[REDACTED]")
    return answer


# --------------------------------------------------------------------------- (a) every action in every place


@pytest.mark.parametrize("surface", ["api", "api-stream", "web"])
@pytest.mark.parametrize("place,action", list(CASES))
def test_each_action_in_each_place(client, state, engine, surface, place, action):
    user, answer = CASES[(place, action)]
    engine.script = answer
    since = last_flag_id(state)
    if surface == "web":
        login(client, "ann1")
        text, done, raw, conv_id = web_chat(client, user)
        finish = done["finish_reason"]
    else:
        text, finish, raw = api_chat(client, user, stream=surface == "api-stream")

    refused = action == "refuse"
    if place == "answer" and refused:
        assert text.startswith(SAFE_PREFIX[:20]) and text.endswith("\n\n" + REFUSAL)
        assert SAFE_PREFIX.startswith(text[:-len("\n\n" + REFUSAL)])  # a safe prefix, then the refusal
        for bad in (OTHER, "7654", "Bob"):
            assert bad.encode() not in raw and bad not in text
        # generation was told to stop (how much more the scripted engine made before its next step is timing)
        assert engine.handles[0].cancelled
    else:
        assert text == expected(place, action)
        assert CARD.encode() not in raw
    assert finish == ("content_filter" if refused else "stop")
    if place == "prompt" and refused:
        assert engine.prompts == []  # nothing generated
    elif place == "prompt" and action == "redact":
        assert "[REDACTED]" in engine.prompts[0] and CARD not in engine.prompts[0]  # the model saw it redacted
    else:
        assert user in engine.prompts[0]

    flags = new_flags(state, since)
    if action == "allow":
        assert flags == []
    else:
        assert [(f["place"], f["action"]) for f in flags] == [(place, action)]
        flag = flags[0]
        assert flag["status"] == "pending" and flag["source"] == ("web" if surface == "web" else "api")
        assert flag["prompt"][-1]["content"] == user  # as sent, even when redacted for the model
        assert flag["answer_delivered"] == text and flag["model_id"] == "tiny-a" and flag["layer"] == "rules"
        if place == "answer":
            # the unsafe original as the guard read it, for reviewers (the engine may have run a little further)
            assert engine.handles[0].text.startswith(flag["answer_generated"])
            if action == "refuse":
                assert OTHER in flag["answer_generated"] and OTHER not in flag["answer_delivered"]
            else:
                assert flag["answer_generated"] == answer
            assert flag["text"] == flag["answer_generated"]
        else:
            assert flag["text"] == user
        if surface == "web":
            assert flag["conversation_id"] == conv_id and flag["ident"] == "user:ann1"
            conv = client.get(f"/api/conversations/{conv_id}").json()
            stored = {m["role"]: m for m in conv["messages"]}
            assert flag["message_id"] == stored["assistant"]["id"]
            assert stored["assistant"]["content"] == text  # stored as delivered, never the unsafe original
            assert stored["assistant"]["finish_reason"] == finish
            if action == "redact" and place == "prompt":
                assert stored["user"]["content"] == user.replace(CARD, "[REDACTED]")


# --------------------------------------------------------------------------- (b) the cut, on the raw bytes


def test_a_streamed_answer_that_turns_unsafe_is_cut_before_the_unsafe_text(client, state, engine):
    engine.script = SAFE_PREFIX + UNSAFE + TAIL
    since = last_flag_id(state)
    body = {"model": "tiny-a", "messages": chat_messages("Where is my order?"), "stream": True, "max_tokens": 150}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        chunks = list(r.iter_bytes())
    raw = b"".join(chunks)
    contents = [json.loads(line[5:])["choices"][0]["delta"].get("content") for line in raw.decode().split("\n")
                if line.startswith("data: {") and json.loads(line[5:])["choices"]]
    text = "".join(c or "" for c in contents)
    # not in the bytes, not in the text the events add up to (a span could straddle two events)
    for bad in (OTHER, "7654", "Bob", "Elm", "never be generated"):
        assert bad.encode() not in raw and bad not in text
    assert text.startswith("Thanks for waiting, Ann!") and text.endswith("\n\n" + REFUSAL)
    assert REFUSAL.encode() in raw  # the refusal comes as one event
    assert b'"finish_reason": "content_filter"' in raw and raw.endswith(b"data: [DONE]\n\n")
    assert len([c for c in contents if c]) >= 3  # the safe prefix streamed before the cut, in several events
    handle = engine.handles[0]
    assert handle.cancelled  # generation was told to stop (what the scripted engine made meanwhile is timing)
    # the guard cut as soon as the other customer's order number was complete
    read = new_flags(state, since)[0]["answer_generated"]
    assert OTHER in read and len(read) <= (SAFE_PREFIX + UNSAFE).index(OTHER) + len(OTHER) + CHECK_EVERY + 4


def test_the_web_chat_cut_is_the_same_on_the_raw_bytes(client, state, engine):
    engine.script = SAFE_PREFIX + UNSAFE + TAIL
    login(client, "rev1")
    text, done, raw, conv_id = web_chat(client, "Where is my order?")
    for bad in (OTHER, "7654", "Bob", "Elm"):
        assert bad.encode() not in raw and bad not in text
    assert REFUSAL.encode() in raw and done["finish_reason"] == "content_filter"
    stored = client.get(f"/api/conversations/{conv_id}").json()["messages"][-1]
    assert stored["content"] == text and OTHER not in stored["content"]


def test_the_filter_never_releases_unchecked_text_or_the_unsafe_span():
    guard = Guard(POLICY)
    answer = SAFE_PREFIX + "x " * LOOKBACK + UNSAFE + TAIL  # the unsafe span far beyond the lookback
    for piece in (1, 3, 7):
        f = guard.answer_filter(chat_messages("hi"))
        out = ""
        for i in range(0, len(answer), piece):
            got = f.push(answer[i:i + piece])
            out += got
            if f.refused:
                break
            assert f.released <= len(f.raw) - POLICY.stream_window or not got
        out += f.finish()
        assert f.refused and OTHER not in out and out.endswith("\n\n" + REFUSAL)
        assert out == f.delivered and answer.startswith(out[:-len("\n\n" + REFUSAL)])
        assert f.verdict.action == "refuse" and f.verdict.category == "customer_data"
    # a safe answer comes out whole, redactions in place, whatever the piece size
    safe = f"Your card {CARD} is on file. " * 3 + "Goodbye!"
    for piece in (1, 5, 50, 1000):
        f = guard.answer_filter(chat_messages("hi"))
        out = "".join(f.push(safe[i:i + piece]) for i in range(0, len(safe), piece)) + f.finish()
        assert out == safe.replace(CARD, "[REDACTED]") and not f.refused


# --------------------------------------------------------------------------- /v1/completions


def test_completions_are_guarded_too(client, state, engine):
    engine.script = SAFE_PREFIX + UNSAFE + TAIL
    r = client.post("/v1/completions", json={"model": "tiny-a", "prompt": [f"Order {OWN}:", "What is my neighbour's "
                                                                           "address?"], "max_tokens": 100})
    assert r.status_code == 200, r.text
    first, second = r.json()["choices"]
    assert OTHER not in first["text"] and first["text"].endswith(REFUSAL) and first["finish_reason"] == "content_filter"
    assert second["text"] == REFUSAL and second["finish_reason"] == "content_filter"
    assert len(engine.prompts) == 1  # the refused prompt generated nothing
    with client.stream("POST", "/v1/completions", json={"prompt": "Order:", "max_tokens": 100, "stream": True}) as r:
        raw = b"".join(r.iter_bytes())
    assert OTHER.encode() not in raw and REFUSAL.encode() in raw and raw.endswith(b"data: [DONE]\n\n")
    for path, body in (("/v1/completions", {"prompt": "hi", "logprobs": 1}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True})):
        r = client.post(path, json=body)
        assert r.status_code == 400 and "safety guard" in r.json()["error"]["message"], r.text


# --------------------------------------------------------------------------- (c) the review queue and the export


def test_flags_are_reviewed_in_the_web_app_and_exported_as_moderation_data(client, state, engine, tmp_path):
    engine.script = SAFE_PREFIX + UNSAFE + TAIL
    since = last_flag_id(state)
    api_chat(client, "Where is my order?", stream=True)  # an answer flag: customer_data, refused
    engine.script = "I am sorry for the wait."
    api_chat(client, "You people are useless!", stream=False)  # a prompt flag: harassment, flagged
    answer_flag, prompt_flag = new_flags(state, since)

    login(client, "ann1")  # annotators do not review flags
    assert client.get("/api/flags").status_code == 403
    login(client, "rev2")
    data = client.get("/api/flags").json()
    assert data["guard"].startswith("chatforge-default") and "customer_data" in data["categories"]
    listed = {f["id"]: f for f in data["flags"]}
    assert {answer_flag["id"], prompt_flag["id"]} <= set(listed)
    shown = listed[answer_flag["id"]]
    assert OTHER in shown["answer_generated"] and OTHER not in shown["answer_delivered"]  # for reviewers only
    assert shown["findings"][0]["evidence"] == OTHER and shown["category"] == "customer_data"
    assert data["counts"]["pending"] >= 2

    r = client.post(f"/api/flags/{answer_flag['id']}/decide", json={"decision": "confirmed", "category": "privacy"})
    assert r.status_code == 200 and r.json()["status"] == "confirmed" and r.json()["reviewer"] == "rev2"
    assert client.post(f"/api/flags/{prompt_flag['id']}/decide", json={"decision": "cleared"}).status_code == 200
    again = client.post(f"/api/flags/{prompt_flag['id']}/decide", json={"decision": "confirmed"})
    assert again.status_code == 409 and "already decided" in again.json()["error"]
    bad = client.post(f"/api/flags/{since + 10_000}/decide", json={"decision": "cleared"})
    assert bad.status_code == 404
    assert client.post(f"/api/flags/{answer_flag['id']}/decide",
                       json={"decision": "maybe"}).status_code == 422
    assert client.post(f"/api/flags/{answer_flag['id']}/decide",
                       json={"decision": "confirmed", "category": "no_such_thing"}).status_code == 422
    pending = {f["id"] for f in client.get("/api/flags").json()["flags"]}
    assert answer_flag["id"] not in pending and prompt_flag["id"] not in pending

    assert export_feedback(state.store, tmp_path, kinds=["moderation"])["moderation"] >= 2
    rows = [row for _, row in read_jsonl(tmp_path / "moderation.jsonl")]
    assert all(set(row) == {"text", "label", "place", "source"} and row["source"] == "review" for row in rows)
    by_text = {row["text"]: row for row in rows}
    assert by_text[answer_flag["answer_generated"]] == {"text": answer_flag["answer_generated"], "label": "privacy",
                                                         "place": "answer", "source": "review"}
    assert by_text["You people are useless!"]["label"] == "safe"
    # the CLI writes the same file (and the admin's export link serves it)
    parser = argparse.ArgumentParser(prog="chatforge")
    add_feedback_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["feedback", "export", "--db", state.store.url, "--out", str(tmp_path / "cli"),
                              "--kind", "moderation"])
    args.func(args)
    assert (tmp_path / "cli" / "moderation.jsonl").read_text() == (tmp_path / "moderation.jsonl").read_text()
    login(client, "admin", ADMIN_PASSWORD)
    r = client.get("/api/admin/export?kind=moderation")
    assert r.status_code == 200 and r.content == (tmp_path / "moderation.jsonl").read_bytes()


def test_the_flags_page_is_served_and_in_the_nav(client):
    r = client.get("/flags")
    assert r.status_code == 200 and 'src="/static/flags.js"' in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/static/flags.js").status_code == 200
    assert '"/flags"' in client.get("/static/common.js").text


# --------------------------------------------------------------------------- (d) --no-guard, (e) bad policies


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_no_guard_serves_unguarded(tmp_path):
    model = "tiny=" + str(tmp_path)  # any existing path: only the guard setting matters here
    assert settings_from_args(parse(model, "--no-db")).guard_policy is None  # off by default
    assert settings_from_args(parse(model, "--no-db", "--no-guard")).guard_policy is None
    assert settings_from_args(parse(model, "--no-db", "--guard", "default")).guard_policy == "default"
    with pytest.raises(SystemExit):
        parse(model, "--guard", "default", "--no-guard")

    app, engine = scripted_app(tmp_path)  # no guard_policy: what `serve --no-guard` builds
    assert app.state.cf.guard is None
    engine.script = SAFE_PREFIX + UNSAFE
    with TestClient(app) as client:
        text, finish, raw = api_chat(client, "What is my neighbour's address?", stream=True)
        assert text == SAFE_PREFIX + UNSAFE and finish == "stop" and b"content_filter" not in raw
        login(client, "rev1")
        text, done, raw, _ = web_chat(client, "What is my neighbour's address?")
        assert text == SAFE_PREFIX + UNSAFE and done["finish_reason"] == "stop"
        r = client.get("/api/flags")
        assert r.status_code == 200 and r.json()["guard"] is None and r.json()["flags"] == []
    app.state.cf.store.close()


def test_a_bad_policy_file_is_an_error_naming_the_file(tmp_path):
    model = "tiny=" + str(tmp_path)
    broken = tmp_path / "broken.toml"
    broken.write_text("name = [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken\.toml: malformed TOML"):
        settings_from_args(parse(model, "--no-db", "--guard", str(broken)))
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('[categories.x]\nname = "x"\nanswer = "delete"\n')
    with pytest.raises(ConfigError, match=r"wrong\.toml: categories\.x\.answer: 'delete' is not one of"):
        settings_from_args(parse(model, "--no-db", "--guard", str(wrong)))
    with pytest.raises(ConfigError, match=r"missing\.toml: no such policy file"):
        settings_from_args(parse(model, "--no-db", "--guard", str(tmp_path / "missing.toml")))
    classifier = tmp_path / "cls.toml"
    classifier.write_text('classifier = "no/such/model"\n[categories.x]\nname = "x"\n')
    with pytest.raises(ConfigError, match=r"cls\.toml: classifier: .*no/such/model is not a directory"):
        Guard.load(classifier, base_dir=tmp_path)


def test_the_flags_page_in_a_browser(tmp_path):
    """Reviewers decide flags on the page; a flagged answer holding markup stays inert text."""
    tb = __import__("test_browser")  # its module-level skip applies when no browser is installed
    from serve_fixtures import live_server

    if tb.UNAVAILABLE:
        tb.skip_or_fail(f"the browser tests cannot run: {tb.UNAVAILABLE}")
    xss = '<img src=x onerror=alert(1)><script>alert("flag")</script>'
    app, _ = scripted_app(tmp_path, guard_policy="default")
    state = app.state.cf
    ids = [service.record_flag(state.store, place="answer", category="customer_data", layer="rules",
                               action="refuse", findings=[{"category": "customer_data", "evidence": OTHER}],
                               prompt=chat_messages(f"hello {xss}"), answer_generated=f"{UNSAFE} {xss}",
                               answer_delivered=REFUSAL, model_id="tiny-a") for _ in range(2)]
    with live_server(app) as base, tb.sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=tb.CHROMIUM, args=tb.ARGS)
        page = browser.new_context(base_url=base).new_page()
        page.set_default_timeout(15_000)
        watch = tb.Watch(page)
        tb.log_in(page, "rev1", then="/flags")
        expect = tb.sync_api.expect
        expect(page.locator(f"#generated-{ids[0]}")).to_have_text(f"{UNSAFE} {xss}")  # as text, not markup
        expect(page.locator(f"#delivered-{ids[0]}")).to_have_text(REFUSAL)
        expect(page.locator("#counts")).to_contain_text("2 pending")
        page.select_option(f"#category-{ids[0]}", "privacy")
        page.click(f"#confirm-{ids[0]}")
        expect(page.locator(f"#flag-{ids[0]}")).to_have_count(0)
        page.click(f"#clear-{ids[1]}")
        expect(page.locator("#done")).to_be_visible()
        expect(page.locator("#counts")).to_contain_text("0 pending · 1 confirmed · 1 cleared")
        browser.close()
        watch.check()
    decided = {f["id"]: f for f in service.list_flags(state.store, None)}
    assert (decided[ids[0]]["status"], decided[ids[0]]["reviewer_category"]) == ("confirmed", "privacy")
    assert decided[ids[1]]["status"] == "cleared" and decided[ids[1]]["reviewer"] == "rev1"
    state.store.close()


def test_a_real_engine_streams_through_the_guard(tmp_path):
    """The tiny model's own (random, harmless) answer passes the guard whole, streamed and not."""
    app, _ = build_app(tmp_path, guard_policy="default", db_url=None)
    with TestClient(app) as client:
        body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 12, "temperature": 0}
        plain = client.post("/v1/chat/completions", json=body).json()["choices"][0]
        streamed, finish, _ = api_chat_body(client, {**body, "stream": True})
        assert plain["finish_reason"] in ("stop", "length") and finish == plain["finish_reason"]
        assert streamed == plain["message"]["content"]


def api_chat_body(client: TestClient, body: dict) -> tuple[str, str, bytes]:
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        raw = b"".join(r.iter_bytes())
    chunks = [json.loads(line[5:]) for line in raw.decode().split("\n") if line.startswith("data: {")]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finish = next(c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    return text, finish, raw
