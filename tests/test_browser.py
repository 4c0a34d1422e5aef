"""The web app in a real browser: Playwright (sync API) drives Debian's chromium against
uvicorn serving tiny models over a temp SQLite database.

Flows: log in; chat with a streamed answer (the text grows, then settles on what was
stored), thumbs + comment; rate with the keyboard; rank K=3 with the move buttons and
K=2 with "B is better"; label with number/letter shortcuts; admin import (pasted and
from a file) + generate + assign + export download; model output and dataset items
holding <script> render as inert text. Every page fails the test on an uncaught script
error or a Content-Security-Policy violation.

Set CHATFORGE_SCREENSHOTS=DIR to save a full-page screenshot of every page there;
CHATFORGE_CHROMIUM overrides the browser binary (default /usr/bin/chromium).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from pathlib import Path

import pytest
from ci import in_ci, skip_or_fail
from serve_fixtures import ADMIN_PASSWORD, PASSWORD, build_app, live_server, never_stop, slow_down

from chatforge.store import service

CHROMIUM = os.environ.get("CHATFORGE_CHROMIUM", "/usr/bin/chromium")
try:
    from playwright import sync_api
except ImportError:
    sync_api, UNAVAILABLE = None, "playwright (python) is not installed"
else:
    UNAVAILABLE = (None if Path(CHROMIUM).exists()
                   else f"no chromium at {CHROMIUM} (install Debian's chromium, or set CHATFORGE_CHROMIUM to one)")
if UNAVAILABLE and not in_ci():  # locally: skip, saying why; under CI=true every test fails with the reason
    pytest.skip(UNAVAILABLE, allow_module_level=True)

expect = sync_api.expect if sync_api is not None else None
XSS = '<script>alert("xss")</script><img src=x onerror=alert(2)>'
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
_names = itertools.count(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browser")
    app, _ = build_app(tmp, n_models=2)
    with live_server(app) as base:
        state = app.state.cf
        slow_down(state, 0.01)  # answers take visible time: the page must show them growing
        never_stop(state)  # ... and run to max_tokens unless stopped
        yield base, state


@pytest.fixture(scope="module")
def browser():
    if UNAVAILABLE:
        skip_or_fail(f"the browser tests cannot run: {UNAVAILABLE}")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


class Watch:
    """Collects what must never happen on a page: dialogs (an injected alert), uncaught
    errors, CSP violations."""

    def __init__(self, page) -> None:
        self.dialogs: list[str] = []
        self.errors: list[str] = []
        page.on("dialog", self._dialog)
        page.on("pageerror", lambda exc: self.errors.append(f"page error: {exc}"))
        page.on("console", self._console)

    def _dialog(self, dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def _console(self, msg) -> None:
        if msg.type == "error" and ("Content Security Policy" in msg.text or "Refused to" in msg.text):
            self.errors.append(f"console: {msg.text}")

    def check(self) -> None:
        assert not self.dialogs, f"a dialog fired: {self.dialogs}"
        assert not self.errors, self.errors


@pytest.fixture
def page(browser, server):
    base, _ = server
    context = browser.new_context(base_url=base, viewport={"width": 1280, "height": 900}, accept_downloads=True)
    context.set_default_timeout(15_000)
    p = context.new_page()
    watch = Watch(p)
    p.watch = watch
    yield p
    context.close()
    watch.check()


def shot(page, name: str) -> None:
    out = os.environ.get("CHATFORGE_SCREENSHOTS")
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(out) / f"{name}.png"), full_page=True)


def new_user(state, role: str) -> str:
    name = f"{role[:3]}{next(_names)}"
    service.create_user(state.store, name, PASSWORD, role)
    return name


def admin_id(state) -> int:
    return service.authenticate(state.store, "admin", ADMIN_PASSWORD)["id"]


def log_in(page, username: str, password: str = PASSWORD, then: str = "/chat") -> None:
    page.goto("/login?next=" + then)
    page.fill("#username-input", username)
    page.fill("#password-input", password)
    page.click("#login-button")
    page.wait_for_url(re.compile(re.escape(then) + "$"))
    expect(page.locator("#username")).to_have_text(username)
    expect(page.locator("body")).to_have_attribute("data-ready", "1")  # the page loaded its data


# --------------------------------------------------------------------------- login, nav


def test_login_nav_roles_logout(page, server):
    _, state = server
    user = new_user(state, "reviewer")
    page.goto("/chat")
    page.wait_for_url(re.compile(r"/login\?next="))  # not logged in: sent to the login page
    page.fill("#username-input", user)
    page.fill("#password-input", "wrong password")
    page.click("#login-button")
    expect(page.locator("#status")).to_have_text("wrong username or password")
    shot(page, "login")
    page.fill("#password-input", PASSWORD)
    page.press("#password-input", "Enter")
    page.wait_for_url(re.compile(r"/chat$"))
    expect(page.locator("#role")).to_have_text("reviewer")
    links = page.locator("nav .links a")
    expect(links).to_have_text(["Chat", "Rate", "Rank", "Flags", "Report"])  # no Label, no Admin for a reviewer
    page.goto("/admin")
    expect(page.locator("main")).to_contain_text("needs the role admin")
    page.click("#logout")
    page.wait_for_url(re.compile(r"/login$"))
    page.goto("/chat")
    page.wait_for_url(re.compile(r"/login\?next="))


def test_log_out_everywhere_ends_the_other_browsers_session(page, browser, server):
    base, state = server
    user = new_user(state, "reviewer")
    log_in(page, user, then="/review")
    other = browser.new_context(base_url=base).new_page()  # the same user on a second browser
    try:
        log_in(other, user)
        other.click("#logout-everywhere")
        other.wait_for_url(re.compile(r"/login$"))
        page.reload()  # the first browser's session ended too: back to the login page, then here again
        page.wait_for_url(re.compile(r"/login\?next=%2Freview$"))
        log_in(page, user, then="/review")
    finally:
        other.context.close()


# --------------------------------------------------------------------------- chat


def test_chat_streams_then_feedback_and_regenerate(page, server):
    _, state = server
    user = new_user(state, "annotator")
    log_in(page, user)
    expect(page.locator("#model-field")).to_be_visible()  # two models: a picker
    page.select_option("#model", "tiny-b")
    page.fill("#system", "You answer about parcels.")
    page.fill("#max-tokens", "60")
    # Record the streaming bubble's text length at every change: it must grow step by step.
    page.evaluate("""() => {
      window.__lengths = [];
      new MutationObserver((records) => {
        for (const r of records) {
          const live = r.target.closest && r.target.closest('#streaming');
          if (!live) continue;
          for (const n of r.addedNodes) window.__lengths.push(n.textContent.length);
        }
      }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    page.fill("#input", "Where is my parcel?")
    page.press("#input", "Enter")
    expect(page.locator("#streaming")).to_be_visible()
    final = page.locator("#messages .msg.assistant .fb")
    expect(final).to_have_count(1, timeout=30_000)
    lengths = page.evaluate("window.__lengths")
    growing = [n for n in lengths if n > 0]
    assert len(set(growing)) >= 3 and growing == sorted(growing), lengths  # grew in steps, never shrank

    conv = service.list_conversations(state.store, service.authenticate(state.store, user, PASSWORD)["id"])[0]
    uid = service.authenticate(state.store, user, PASSWORD)["id"]
    stored = service.get_conversation(state.store, uid, conv["id"])
    assert stored["model_id"] == "tiny-b" and stored["system"] == "You answer about parcels."
    answer = [m for m in stored["messages"] if m["role"] == "assistant"][0]
    assert answer["model_version"] == state.models["tiny-b"].version
    shown = page.locator("#messages .msg.assistant .text").inner_text()
    assert shown.strip() == answer["content"].strip() and max(growing) == len(answer["content"])
    expect(page.locator("#messages .msg.user .text")).to_have_text("Where is my parcel?")

    bubble = page.locator("#messages .msg.assistant").last
    bubble.get_by_role("button", name="Thumbs up").click()
    expect(bubble.locator(".fb-status")).to_have_text("saved")
    bubble.locator(".fb-comment").fill("Too vague; no tracking link.")
    bubble.get_by_role("button", name="Save comment").click()
    expect(bubble.locator(".fb-status")).to_have_text("saved")
    msg = next(m for m in service.get_conversation(state.store, uid, conv["id"])["messages"] if m["id"] == answer["id"])
    assert msg["thumb"] == 1 and msg["comment"] == "Too vague; no tracking link."
    shot(page, "chat")

    page.click("#regenerate")
    expect(page.locator("#messages .msg.assistant .fb")).to_have_count(1, timeout=30_000)
    expect(page.locator("#regenerate")).to_be_enabled()
    msgs = service.get_conversation(state.store, uid, conv["id"])["messages"]
    answers = [m for m in msgs if m["role"] == "assistant"]
    assert len(answers) == 2 and answers[0]["parent_id"] == answers[1]["parent_id"]  # a sibling
    new_text = page.locator("#messages .msg.assistant .text").inner_text()
    assert new_text.strip() == answers[1]["content"].strip()


def test_stop_keeps_the_partial_answer(page, server):
    _, state = server
    user = new_user(state, "reviewer")
    log_in(page, user)
    page.fill("#max-tokens", "200")  # 2 s at the test server's pace
    page.fill("#input", "Tell me everything")
    page.click("#send")
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#streaming .text")).to_have_text(re.compile(".{5,}"))
    page.click("#stop")
    expect(page.locator("#status")).to_have_text("stopped")
    expect(page.locator("#messages .msg.assistant .fb")).to_have_count(1)
    expect(page.locator("#stop")).to_be_hidden()
    uid = service.authenticate(state.store, user, PASSWORD)["id"]
    conv = service.list_conversations(state.store, uid)[0]
    answer = [m for m in service.get_conversation(state.store, uid, conv["id"])["messages"] if m["role"] == "assistant"]
    assert len(answer) == 1 and 5 <= len(answer[0]["content"]) < 150  # cut short, and kept
    assert page.locator("#messages .msg.assistant .text").inner_text().strip() == answer[0]["content"].strip()


def test_model_output_with_script_renders_inert(page, server):
    _, state = server
    user = new_user(state, "reviewer")
    uid = service.authenticate(state.store, user, PASSWORD)["id"]
    conv_id = service.create_conversation(state.store, uid, "tiny-a", system=XSS)
    q = service.add_message(state.store, conv_id, "user", XSS)
    service.add_message(state.store, conv_id, "assistant", "Sure: " + XSS, model_id="tiny-a",
                        model_version=state.models["tiny-a"].version, parent_id=q)
    log_in(page, user, then=f"/chat?c={conv_id}")
    answer = page.locator("#messages .msg.assistant .text")
    expect(answer).to_have_text("Sure: " + XSS)  # the markup is shown as text
    expect(page.locator("#messages .msg.user .text")).to_have_text(XSS)
    expect(page.locator("#messages .msg.system .text")).to_have_text(XSS)  # the system prompt, shown too
    expect(page.locator("#conversations button.active")).to_have_text(XSS[:80])
    assert page.locator("#messages script, #messages img, #conversations img").count() == 0
    page.wait_for_timeout(200)  # an onerror handler would have fired by now
    shot(page, "chat-xss")
    page.watch.check()


# --------------------------------------------------------------------------- review


def _prompt_dataset(state, name: str, prompts: list[str], responses: list[list[str]]) -> tuple[int, list[list[int]]]:
    ds = service.import_dataset(state.store, name, "prompts", [{"prompt": p} for p in prompts], admin_id(state))
    ids = []
    for p, texts in zip(service.prompts_needing_responses(state.store, ds["id"], "tiny-a", 1), responses):
        ids.append([service.add_response(state.store, p["id"], "tiny-a", "v", t) for t in texts])
    return ds["id"], ids


def test_rate_with_keyboard(page, server):
    from sqlalchemy import select

    from chatforge.store.models import Rating

    _, state = server
    user = new_user(state, "reviewer")
    ds, ids = _prompt_dataset(state, "rate-set", ["How do refunds work?"], [["Refunds take 5 days.", XSS]])
    service.assign(state.store, ds, "rate", [user], 1)
    log_in(page, user, then="/review")
    expect(page.locator("#progress-text")).to_have_text("0 / 2")
    expect(page.locator("#guidelines")).to_contain_text("Fluency")
    expect(page.locator("#prompt")).to_contain_text("How do refunds work?")
    first = page.locator("#response").inner_text()
    for key in "4352":  # one key per aspect: fluency, coherence, relevance, appropriateness
        page.keyboard.press(key)
    expect(page.locator("#fluency-4")).to_be_checked()
    expect(page.locator("#appropriateness-2")).to_be_checked()
    expect(page.locator("#hint-fluency")).to_contain_text("fluent with minor slips")
    shot(page, "review")
    page.keyboard.press("Enter")
    expect(page.locator("#progress-text")).to_have_text("1 / 2")
    second = page.locator("#response").inner_text()
    assert {first, second} == {"Refunds take 5 days.", XSS}  # the <script> one shows as text
    # Tab moves between aspects: click 5 on fluency, tab to coherence, then keys score from there
    page.click("label[for=fluency-5]")
    page.keyboard.press("Tab")
    for key in "111":
        page.keyboard.press(key)
    page.fill("#comment", "Robert'); DROP TABLE ratings; --")
    page.click("#submit")
    expect(page.locator("#done")).to_be_visible()
    with state.store.session() as s:
        rows = {r.response_id: r for r in s.scalars(select(Rating).where(Rating.response_id.in_(ids[0])))}
        got = {rid: (r.fluency, r.coherence, r.relevance, r.appropriateness, r.comment) for rid, r in rows.items()}
    by_text = dict(zip(["Refunds take 5 days.", XSS], ids[0]))
    assert got[by_text[first]] == (4, 3, 5, 2, None)
    assert got[by_text[second]] == (5, 1, 1, 1, "Robert'); DROP TABLE ratings; --")


def test_rank_three_by_buttons_then_pair(page, server, tmp_path):
    from sqlalchemy import select

    from chatforge.store.export import export_feedback
    from chatforge.store.models import Ranking

    _, state = server
    user = new_user(state, "reviewer")
    ds, ids = _prompt_dataset(state, "rank-set", ["Best way to return a parcel?", "Pick one"],
                              [["answer alpha", "answer beta", "answer gamma"], ["left " + XSS, "right answer"]])
    service.assign(state.store, ds, "rank", [user], 1)
    log_in(page, user, then="/rank")
    expect(page.locator("#progress-text")).to_have_text("0 / 2")
    cards = page.locator("#cards .card")
    expect(cards).to_have_count(3)
    # drag and drop: the last card dropped on the first takes its place
    before = [c.inner_text() for c in cards.locator(".text-block").all()]
    cards.nth(2).drag_to(cards.nth(0))
    expect(cards.locator(".text-block")).to_have_text([before[2], before[0], before[1]])
    want = ["answer gamma", "answer alpha", "answer beta"]
    # selection sort with the buttons: bring each wanted text to its place
    for target, text in enumerate(want):
        shown = [c.inner_text() for c in cards.locator(".text-block").all()]
        at = shown.index(text)
        while at > target:
            cards.nth(at).get_by_role("button", name=re.compile("Move response up")).click()
            at -= 1
    expect(cards.locator(".text-block")).to_have_text(want)
    expect(cards.locator(".rank")).to_have_text(["1", "2", "3"])
    shot(page, "rank")
    page.click("#submit")
    # K = 2: side by side with one-click buttons
    expect(page.locator("#b-better")).to_be_visible()
    expect(page.locator("#progress-text")).to_have_text("1 / 2")
    sides = page.locator("#cards .pair .text-block")
    expect(sides).to_have_count(2)
    b_text = sides.nth(1).inner_text()
    assert {sides.nth(0).inner_text(), b_text} == {"left " + XSS, "right answer"}
    shot(page, "rank-pair")
    page.click("#b-better")
    expect(page.locator("#done")).to_be_visible()
    text_to_id = dict(zip(["answer alpha", "answer beta", "answer gamma", "left " + XSS, "right answer"],
                          ids[0] + ids[1]))
    with state.store.session() as s:
        orders = {r.prompt_id: r.order for r in s.scalars(select(Ranking).where(Ranking.assignment_id.in_(
            _assignment_ids(state, user))))}
    assert sorted(orders.values()) == sorted([[text_to_id[t] for t in want],
                                              [text_to_id[b_text], *(set(ids[1]) - {text_to_id[b_text]})]])
    # round trip: `feedback export` gives exactly the pairs the ranks given on the page imply
    export_feedback(state.store, tmp_path, kinds=("preferences",))
    rows = [json.loads(line) for line in (tmp_path / "preferences.jsonl").read_text().splitlines()]
    pairs = {(r["prompt"][-1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"])
             for r in rows if r["meta"]["user"] == user}
    b_loser = ({"left " + XSS, "right answer"} - {b_text}).pop()
    q = "Best way to return a parcel?"
    assert pairs == {(q, want[0], want[1]), (q, want[0], want[2]), (q, want[1], want[2]),
                     ("Pick one", b_text, b_loser)}


def _assignment_ids(state, username: str) -> list[int]:
    from sqlalchemy import select

    from chatforge.store.models import Assignment, User
    with state.store.session() as s:
        uid = s.scalar(select(User.id).where(User.username == username))
        return list(s.scalars(select(Assignment.id).where(Assignment.user_id == uid)))


# --------------------------------------------------------------------------- label


def test_label_with_keyboard_shortcuts(page, server):
    from sqlalchemy import select

    from chatforge.store.models import Label

    _, state = server
    user = new_user(state, "annotator")
    ds = service.import_dataset(state.store, "label-set", "items", [{"text": "My parcel is late again."},
                                                                    {"text": XSS}], admin_id(state))
    schema = service.create_label_schema(state.store, "triage", [
        {"name": "sentiment", "type": "choice", "options": ["positive", "neutral", "negative"], "required": True},
        {"name": "urgent", "type": "bool", "required": True},
        {"name": "note", "type": "text", "required": False}])
    service.assign(state.store, ds["id"], "label", [user], 1, schema_id=schema)
    log_in(page, user, then="/label")
    expect(page.locator("#progress-text")).to_have_text("0 / 2")
    first = page.locator("#item-text").inner_text()
    page.keyboard.press("3")
    page.keyboard.press("y")
    expect(page.locator("button.choice.selected")).to_have_text(["3 negative", "Y Yes"])
    shot(page, "label")
    page.keyboard.press("Enter")
    expect(page.locator("#progress-text")).to_have_text("1 / 2")
    second = page.locator("#item-text").inner_text()
    assert {first, second} == {"My parcel is late again.", XSS}  # shown literally
    page.keyboard.press("Enter")  # nothing chosen yet: refused on the page
    expect(page.locator("#status")).to_contain_text("Fill in: sentiment, urgent")
    page.keyboard.press("1")
    page.keyboard.press("n")
    page.fill("#text-note", "spam?")
    page.press("#text-note", "Enter")
    expect(page.locator("#done")).to_be_visible()
    with state.store.session() as s:
        values = {lb.item_id: lb.value for lb in s.scalars(select(Label).where(Label.assignment_id.in_(
            _assignment_ids(state, user))))}
    assert sorted(values.values(), key=json.dumps) == sorted(
        [{"sentiment": "negative", "urgent": True, "note": None}, {"sentiment": "positive", "urgent": False, "note": "spam?"}],
        key=json.dumps)


# --------------------------------------------------------------------------- admin


def test_admin_import_generate_assign_export(page, server, tmp_path):
    _, state = server
    rater = new_user(state, "reviewer")
    log_in(page, "admin", ADMIN_PASSWORD, then="/admin")
    # import by pasting
    page.fill("#dataset-name", "pasted-prompts")
    page.fill("#dataset-jsonl", '{"prompt": "Where is my parcel?"}\n{"prompt": "' + XSS.replace('"', '\\"') + '"}\n')
    page.click("#import")
    expect(page.locator("#datasets-status")).to_contain_text("imported 2 rows")
    expect(page.locator("#datasets")).to_contain_text("pasted-prompts")
    # import from a file (read in the browser, sent as JSON text)
    f = tmp_path / "tickets.jsonl"
    f.write_text('{"text": "parcel lost"}\n{"text": "refund now"}\n{"text": "thanks!"}\n')
    page.set_input_files("#dataset-file", str(f))
    expect(page.locator("#dataset-name")).to_have_value("pasted-prompts")  # a typed name is kept
    page.fill("#dataset-name", "tickets")
    page.select_option("#dataset-kind", "items")
    expect(page.locator("#dataset-jsonl")).to_have_value(re.compile("parcel lost"))
    page.click("#import")
    expect(page.locator("#datasets-status")).to_contain_text("imported 3 rows")
    # a bad line is reported with its number
    page.fill("#dataset-name", "broken")
    page.fill("#dataset-jsonl", '{"text": "ok"}\n{oops}\n')
    page.click("#import")
    expect(page.locator("#datasets-status")).to_contain_text("line 2")

    ds_id = next(d["id"] for d in service.list_datasets(state.store) if d["name"] == "pasted-prompts")
    page.select_option("#gen-dataset", str(ds_id))
    page.fill("#gen-per-model", "1")
    page.fill("#gen-max-tokens", "8")
    page.click("#generate")
    expect(page.locator("#generate-status")).to_contain_text("tiny-a: 2, tiny-b: 2", timeout=30_000)

    page.select_option("#assign-dataset", str(ds_id))
    page.select_option("#assign-kind", "rate")
    for box in page.locator(".assign-user").all():
        box.set_checked(box.get_attribute("value") == rater)
    page.fill("#assign-overlap", "1")
    page.click("#assign")
    expect(page.locator("#assign-status")).to_have_text("assigned 4 tasks")
    expect(page.locator("#progress")).to_contain_text(rater)

    # the rater does one, then the admin downloads the ratings
    a = service.next_assignment(state.store, service.authenticate(state.store, rater, PASSWORD)["id"], "rate")
    service.submit_rating(state.store, service.authenticate(state.store, rater, PASSWORD)["id"], a["assignment_id"],
                          {"fluency": 5, "coherence": 4, "relevance": 3, "appropriateness": 2}, "from the browser test")
    page.click("#refresh")
    expect(page.locator("#progress")).to_contain_text("1")
    shot(page, "admin")
    with page.expect_download() as info:
        page.click("#export-ratings")
    download = info.value
    assert download.suggested_filename == "ratings.jsonl"
    rows = [json.loads(line) for line in Path(download.path()).read_text().splitlines() if line.strip()]
    assert any(json.dumps(r).count("from the browser test") for r in rows)

    # users: add one and change a role
    page.fill("#new-username", "fresh1")
    page.fill("#new-password", "pw-fresh-123")
    page.select_option("#new-role", "annotator")
    page.click("#add-user")
    expect(page.locator("#users-status")).to_have_text("added fresh1 (annotator)")
    page.select_option("select[data-user=fresh1]", "reviewer")
    expect(page.locator("#users-status")).to_have_text("fresh1 is now reviewer")
    assert {u["username"]: u["role"] for u in service.list_users(state.store)}["fresh1"] == "reviewer"
