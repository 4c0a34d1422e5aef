"""Replays of an outside probe of ``chatforge serve`` (issue 17): every attack, as an attacker sends it.

All traffic stays on loopback: live uvicorn servers on 127.0.0.1 (configured as ``chatforge
serve`` configures uvicorn), clients bound to 127.0.0.x source addresses to play several
machines, and a headless chromium whose every request off this server is aborted before it
leaves (and whose host resolver resolves nothing). Loops are bounded in count and time.

Each test states the attack and what the server answers now; against the code before the
hardening each one fails (the old answer is in the test's docstring).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from serve_fixtures import ADMIN_PASSWORD, PASSWORD, build_app, free_port, live_server, never_stop, slow_down
from sqlalchemy import select

from chatforge.store import service
from chatforge.store.models import LoginSession, User, utcnow

DEEP = 100_000  # far past Python's recursion limit (a RecursionError in json.loads)
FREE = 5  # failed attempts allowed at once per account+address (FailureThrottle's default)


def patient(state) -> None:
    """Back-off waits start at 60 s instead of 1 s, so no wait can expire between two requests of a
    test on a busy machine. (The server before the hardening had no back-off to set.)"""
    for throttle in (getattr(state, "login_throttle", None), getattr(state, "key_throttle", None)):
        if throttle is not None:
            assert throttle.free == FREE
            throttle.base = 60.0


def client(base: str, source: str = "127.0.0.1", **kw) -> httpx.Client:
    """An HTTP client whose connections come from ``source`` (any 127.0.0.0/8 address is this machine)."""
    return httpx.Client(base_url=base, timeout=60, transport=httpx.HTTPTransport(local_address=source), **kw)


def login_status(base: str, username: str, password: str, source: str = "127.0.0.1",
                 headers: dict[str, str] | None = None) -> int:
    with client(base, source) as c:
        return c.post("/api/login", json={"username": username, "password": password}, headers=headers).status_code


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The default configuration (as ``chatforge serve`` with a database), users rev1..rev6, ann1."""
    app, _ = build_app(tmp_path_factory.mktemp("security"))
    with live_server(app) as base:
        state = app.state.cf
        patient(state)
        for i in range(1, 7):
            service.create_user(state.store, f"rev{i}", PASSWORD, "reviewer")
        service.create_user(state.store, "ann1", PASSWORD, "annotator")
        yield base, state


# --------------------------------------------------------------------------- 1. login throttling


def test_parallel_wrong_guesses_are_counted_before_the_check(server):
    """15 parallel wrong passwords for one account. Before: all 15 answered 401 (the limit of 10 was
    checked before, and the failure recorded after, the password check). Now: the first
    ``free`` (5) get 401 and every other one 429, however they interleave."""
    base, _ = server
    with ThreadPoolExecutor(15) as pool:
        codes = list(pool.map(lambda i: login_status(base, "rev1", f"guess-{i}"), range(15)))
    assert sorted(codes) == [401] * FREE + [429] * (15 - FREE), codes


def test_a_guesser_cannot_lock_anyone_else_out(server):
    """After an attacker's guesses at rev2 from 127.0.0.1, rev2 logs in from their own machine
    (127.0.0.2). Before: 429 for 300 s (the account itself was locked). Now: 200; only the guesser's
    own account+address pair backs off."""
    base, _ = server
    codes = [login_status(base, "rev2", "guess") for _ in range(12)]
    assert codes == [401] * FREE + [429] * (12 - FREE)
    assert login_status(base, "rev2", PASSWORD, source="127.0.0.2") == 200
    assert login_status(base, "rev2", PASSWORD) == 429  # the guesser's own pair waits (back-off, not lock-out)


def test_another_accounts_success_does_not_reset_the_count(server):
    """An attacker on 127.0.0.3 guesses at rev3, logging into their own account (rev4) between
    guesses. Before: each success reset the address's counter, so guessing never slowed down.
    Now: rev3's count from that address is untouched and the next guess is refused."""
    base, _ = server
    source = "127.0.0.3"
    assert [login_status(base, "rev3", "guess", source) for _ in range(FREE)] == [401] * FREE
    assert login_status(base, "rev4", PASSWORD, source) == 200
    assert login_status(base, "rev3", "guess", source) == 429


# --------------------------------------------------------------------------- 2. forged client addresses


def test_forwarded_for_from_a_client_is_not_believed(tmp_path):
    """A loopback client claims other addresses with X-Forwarded-For. Before: uvicorn believed any
    loopback peer, so after 5 requests and a 429, 10 more with forged addresses all got 200, and
    the access log recorded the forged addresses. Now: still 429, and the log shows 127.0.0.1."""
    log = tmp_path / "access.jsonl"
    app, _ = build_app(tmp_path, rate_limit_per_minute=5, access_log=log)
    patient(app.state.cf)
    with live_server(app) as base, client(base) as c:
        assert [c.get("/v1/models").status_code for _ in range(5)] == [200] * 5
        assert c.get("/v1/models").status_code == 429
        forged = [c.get("/v1/models", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code for i in range(10)]
        assert forged == [429] * 10
        # the login throttle is not escaped either
        for _ in range(FREE):
            assert c.post("/api/login", json={"username": "admin", "password": "guess"}).status_code == 401
        r = c.post("/api/login", json={"username": "admin", "password": "guess"},
                   headers={"X-Forwarded-For": "198.51.100.7"})
        assert r.status_code == 429
    time.sleep(0.1)
    clients = {json.loads(line)["client"] for line in log.read_text().splitlines()}
    assert clients == {"127.0.0.1"}


def test_a_named_proxy_is_believed(tmp_path):
    """With --forwarded-allow-ips 127.0.0.1 (a reverse proxy on this machine) the proxy's
    X-Forwarded-For is the client: each forwarded client gets its own bucket."""
    app, _ = build_app(tmp_path, rate_limit_per_minute=2, forwarded_allow_ips=("127.0.0.1",))
    with live_server(app) as base, client(base) as c:
        a = [c.get("/v1/models", headers={"X-Forwarded-For": "203.0.113.1"}).status_code for _ in range(3)]
        b = c.get("/v1/models", headers={"X-Forwarded-For": "203.0.113.2"}).status_code
    assert a == [200, 200, 429] and b == 200


# --------------------------------------------------------------------------- 3. open redirect after login


@pytest.mark.parametrize("target", ["/\t/evil.example/phish", "/\n/evil.example/phish", "/\\evil.example/phish",
                                    "//evil.example/phish", " //evil.example", "https://evil.example/"])
def test_login_refuses_redirects_off_the_site(server, target):
    """/login?next=/%09/evil.example/phish. Before: the page's check missed the tab that browsers strip,
    and the browser went to http://evil.example/phish. Now: the server judges ``next`` as a browser
    reads it and answers "/chat" for anything that leaves the site."""
    base, _ = server
    with client(base) as c:
        r = c.post("/api/login", json={"username": "rev5", "password": PASSWORD, "next": target})
    assert r.status_code == 200 and r.json()["next"] == "/chat"


@contextlib.contextmanager
def browser_page(base: str):
    """A chromium page whose every request off ``base`` is aborted before it leaves (and recorded in
    ``page.left``), with a host resolver that resolves nothing; ``page.problems`` collects uncaught
    errors and Content-Security-Policy violations."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    chromium = os.environ.get("CHATFORGE_CHROMIUM", "/usr/bin/chromium")
    if not Path(chromium).exists():
        pytest.skip(f"no chromium at {chromium} (set CHATFORGE_CHROMIUM to a chromium binary)")
    args = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=args)
        try:
            page = browser.new_page()
            page.left, page.problems = [], []

            def only_this_server(route) -> None:
                if route.request.url.startswith(base + "/"):
                    route.continue_()
                else:  # never let a request leave this machine
                    page.left.append(route.request.url)
                    route.abort()

            page.route("**/*", only_this_server)
            page.on("pageerror", lambda exc: page.problems.append(f"page error: {exc}"))
            page.on("console", lambda msg: page.problems.append(msg.text) if msg.type == "error" else None)
            yield page
        finally:
            browser.close()


def test_login_page_stays_on_the_site_in_a_real_browser(server):
    """The same in chromium: log in on /login?next=/%09/evil.example/phish and see where the browser goes."""
    base, _ = server
    with browser_page(base) as page:
        page.goto(base + "/login?next=/%09/evil.example/phish")
        page.fill("#username-input", "rev6")
        page.fill("#password-input", PASSWORD)
        page.click("#login-button")
        page.wait_for_url(re.compile(re.escape(base) + r"/chat$"), timeout=15_000)
        assert not page.left, f"the browser tried to leave the site: {page.left}"


# --------------------------------------------------------------------------- 4. deeply nested JSON


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize("path", ["/api/login", "/v1/chat/completions", "/v1/completions"])
def test_deeply_nested_bodies_get_a_clean_400(server, path):
    """A body nested 100,000 levels deep. Before: 500 with a RecursionError traceback (on /api/login
    without logging in). Now: 400 that says the body is nested too deeply, in each router's shape."""
    base, _ = server
    with client(base) as c:
        for depth in (33, DEEP):
            body = '{"username": ' + nested(depth) + ', "messages": ' + nested(depth) + "}"
            r = c.post(path, content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (path, depth, r.text[:200])
            err = r.json()["error"]
            message = err["message"] if isinstance(err, dict) else err
            assert "nested more than 32 levels deep" in message
        ok = c.post(path, content=json.dumps({"username": nested(30)}), headers={"Content-Type": "application/json"})
        assert ok.status_code != 500 and "nested" not in ok.text  # 30 levels are fine (then other checks apply)


def test_a_deeply_nested_imported_row_is_a_row_error(server):
    """An admin imports JSONL whose second row nests 100,000 levels. Before: 500. Now: 422 naming the line."""
    base, _ = server
    with client(base) as c:
        assert c.post("/api/login", json={"username": "admin", "password": ADMIN_PASSWORD}).status_code == 200
        jsonl = '{"text": "fine"}\n{"text": "x", "meta": ' + nested(DEEP) + "}\n"
        r = c.post("/api/admin/datasets", json={"name": "deep", "kind": "items", "jsonl": jsonl})
    assert r.status_code == 422 and r.json()["field"] == "jsonl"
    assert r.json()["error"] == "jsonl line 2: JSON nested more than 32 levels deep"


# --------------------------------------------------------------------------- 5. unbounded completions


def test_too_many_prompts_in_one_request(server):
    """200 echo-scored prompts in one /v1/completions request. Before: 200, all scored, counted as one
    request (1,000 took 4.5 s). Now: 400 before any work, naming the limit."""
    base, state = server
    body = {"prompt": ["Your order shipped today."] * 200, "max_tokens": 0, "echo": True, "logprobs": 1}
    with client(base) as c:
        t0 = time.monotonic()
        r = c.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_prompts"
    assert f"at most {state.settings.max_prompts_per_request} prompts" in r.json()["error"]["message"]
    assert time.monotonic() - t0 < 5


def test_tokens_count_against_the_rate_limit(tmp_path):
    """Requests whose prompts + max_tokens x prompts add up. Before: only requests were counted, so
    each was one request whatever it cost. Now: a request larger than the per-minute token budget
    is refused, and one that would overdraw what is left gets 429 with Retry-After."""
    app, _ = build_app(tmp_path, rate_limit_per_minute=1000, rate_limit_tokens_per_minute=300)
    with live_server(app) as base, client(base) as c:
        never_stop(app.state.cf)  # every answer runs to max_tokens: costs are exact
        big = c.post("/v1/completions", json={"prompt": ["Hi"] * 8, "max_tokens": 50, "temperature": 0})
        assert big.status_code == 429 and big.json()["error"]["type"] == "tokens"
        assert "more than the limit of 300 tokens per minute" in big.json()["error"]["message"]
        body = {"prompt": ["Hi"] * 2, "max_tokens": 100, "temperature": 0}  # 2 x (3 + 100) = 206 tokens
        first = c.post("/v1/completions", json=body)
        assert first.status_code == 200 and first.json()["usage"]["total_tokens"] == 206
        second = c.post("/v1/completions", json=body)
        assert second.status_code == 429 and int(second.headers["retry-after"]) >= 1
        assert "300 tokens per minute" in second.json()["error"]["message"]


def test_one_request_cannot_take_every_engine_slot(tmp_path):
    """A request with as many prompts as the engine has slots and queue places (8), then another
    client's one-prompt request. Before: the first filled every slot and the queue, the other got
    503. Now: one request has at most max_batch/2 prompts in the engine; the other gets 200."""
    app, settings = build_app(tmp_path, max_batch=4, max_queue=4)
    with live_server(app) as base:
        state = app.state.cf
        slow_down(state, 0.01)
        never_stop(state)
        engine = state.models["tiny-a"].engine
        results: dict[str, httpx.Response] = {}

        def big() -> None:
            with client(base) as c:
                results["big"] = c.post("/v1/completions", json={"prompt": ["Hi"] * 8, "max_tokens": 60})

        thread = threading.Thread(target=big)
        thread.start()
        seen, t0 = 0, time.monotonic()
        while time.monotonic() - t0 < 1.0 or not seen:  # watch the engine while the big request runs
            stats = engine.stats()
            seen = max(seen, stats["running"] + stats["waiting"])
            assert time.monotonic() - t0 < 30, "the big request never reached the engine"
            time.sleep(0.01)
        with client(base, "127.0.0.2") as c:
            other = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                         "max_tokens": 3})
        thread.join(60)
    assert other.status_code == 200, other.text
    assert seen <= settings.inflight_per_request == 2
    assert results["big"].status_code == 200
    assert [c["finish_reason"] for c in results["big"].json()["choices"]] == ["length"] * 8


# --------------------------------------------------------------------------- 6. cross-site and DNS rebinding


def test_v1_refuses_simple_cross_site_requests(server):
    """A web page the user visits POSTs to /v1 with Content-Type text/plain (a "simple" request: no
    preflight). Before: 200, the model ran. Now: 415; only application/json is accepted, and that
    needs a CORS preflight which this server never grants."""
    base, _ = server
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    with client(base) as c:
        for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            r = c.post("/v1/chat/completions", content=body, headers={"Content-Type": ctype})
            assert r.status_code == 415 and "application/json" in r.json()["error"]["message"], ctype
        assert c.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                          "Access-Control-Request-Method": "POST"}
                         ).headers.get("access-control-allow-origin") is None


@pytest.mark.parametrize("path", ["/v1/models", "/api/me", "/health", "/login"])
def test_dns_rebinding_host_is_refused(server, path):
    """A page at evil.example whose name now resolves to 127.0.0.1 reads the API: its requests carry
    Host: evil.example. Before: answered (200 for /v1/models). Now: 400 for any name that is not
    a loopback name, an IP address or one given with --allowed-hosts."""
    base, _ = server
    port = base.rsplit(":", 1)[1]
    with client(base) as c:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example", "localhost.evil.example"):
            r = c.get(path, headers={"Host": host})
            assert r.status_code == 400 and "not allowed" in r.text, (host, r.status_code)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "[::1]", "app.localhost"):
            assert c.get(path, headers={"Host": host}).status_code != 400, host


def test_allowed_hosts_are_answered(tmp_path):
    app, _ = build_app(tmp_path, allowed_hosts=("chat.example", "*.team.example"))
    with live_server(app) as base, client(base) as c:
        assert c.get("/v1/models", headers={"Host": "chat.example"}).status_code == 200
        assert c.get("/v1/models", headers={"Host": "a.team.example:8000"}).status_code == 200
        assert c.get("/v1/models", headers={"Host": "team.example.evil"}).status_code == 400


def test_no_redirect_reflects_the_host(server):
    """GET /chat/ and /health/ with a forged Host. Before: 307 to http://evil.example/chat/ (the
    trailing-slash redirect is built from Host). Now: the Host is refused, and even with a good Host
    there is no slash redirect (404); the one redirect left (/ -> /chat) is a relative path."""
    base, _ = server
    with client(base) as c:
        for path in ("/chat/", "/health/", "/v1/completions/"):
            forged = c.get(path, headers={"Host": "evil.example"})
            assert forged.status_code == 400 and "location" not in forged.headers, path
            plain = c.get(path)
            assert "location" not in plain.headers and plain.status_code in (404, 405), (path, plain.status_code)
        assert c.get("/").headers["location"] == "/chat"


# --------------------------------------------------------------------------- 7. the smaller ones


def test_wrong_api_keys_back_off_before_any_lookup(tmp_path, monkeypatch):
    """15 parallel requests with wrong keys. Before: 15 x 401, each a database lookup, never limited.
    Now: 5 lookups (401), then 429 without a lookup; the address's good key still works, and
    another machine's client is not slowed down."""
    lookups = []
    real = service.user_for_api_key

    def counted(store, key):
        lookups.append(key)
        return real(store, key)

    monkeypatch.setattr(service, "user_for_api_key", counted)
    app, _ = build_app(tmp_path, api_keys=("sk-operator",))
    with live_server(app) as base:
        state = app.state.cf
        patient(state)
        rita = service.create_user(state.store, "rita", PASSWORD, "reviewer")
        user_key = service.create_api_key(state.store, rita["id"])

        def wrong(i: int) -> int:
            with client(base) as c:
                return c.get("/v1/models", headers={"Authorization": f"Bearer cf-wrong-{i}"}).status_code

        with ThreadPoolExecutor(15) as pool:
            codes = list(pool.map(wrong, range(15)))
        assert sorted(codes) == [401] * FREE + [429] * (15 - FREE), codes
        assert len(lookups) == FREE
        with client(base) as c:  # the operator's key needs no lookup and never meets the back-off
            assert c.get("/v1/models", headers={"Authorization": "Bearer sk-operator"}).status_code == 200
        with client(base, "127.0.0.2") as c:
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {user_key}"}).status_code == 200
            n = len(lookups)
            for _ in range(5):  # a valid key is remembered: no lookup per request
                assert c.get("/v1/models", headers={"Authorization": f"Bearer {user_key}"}).status_code == 200
            assert len(lookups) == n


def test_a_server_that_needs_no_key_ignores_dummy_keys_cheaply(server, monkeypatch):
    """OpenAI clients always send a key, often "EMPTY", to a server that needs none: those requests
    keep working (as if they sent none), and once the address backs off they cost no lookup."""
    lookups = []
    real = service.user_for_api_key
    monkeypatch.setattr(service, "user_for_api_key", lambda store, key: (lookups.append(key), real(store, key))[1])
    base, _ = server
    with client(base, "127.0.0.4") as c:
        codes = [c.get("/v1/models", headers={"Authorization": "Bearer EMPTY"}).status_code for _ in range(12)]
    assert codes == [200] * 12 and len(lookups) == FREE


def test_docs_are_off_unless_asked_for_and_then_local(server, tmp_path):
    """GET /docs. Before: 200, a page loading Swagger UI from a CDN, no CSP, open although keys were
    required. Now: 404 (and no /openapi.json) unless --docs; with it, every asset from this server
    under a CSP that allows only this origin."""
    base, _ = server
    with client(base) as c:
        assert c.get("/docs").status_code == 404 and c.get("/openapi.json").status_code == 404
        assert c.get("/redoc").status_code == 404
    app, _ = build_app(tmp_path, docs=True)
    with live_server(app) as docs_base, client(docs_base) as c:
        page = c.get("/docs")
        assert page.status_code == 200
        assert "default-src 'self'" in page.headers["content-security-policy"]
        assert "script-src 'self';" in page.headers["content-security-policy"]  # no inline or remote script
        refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
        assert refs and all(ref.startswith("/") and not ref.startswith("//") for ref in refs), refs
        for ref in refs:
            assert c.get(ref).status_code == 200, ref
        init = c.get("/docs/init.js").text
        assert "http" not in init and "validatorUrl: null" in init
        assert "/v1/chat/completions" in c.get("/openapi.json").json()["paths"]
        assert c.get("/docs/assets/../docs.py").status_code == 404  # only Swagger UI's own files
        with browser_page(docs_base) as browser:  # it renders, under that CSP, from this server alone
            browser.goto(docs_base + "/docs")
            browser.wait_for_selector(".opblock", timeout=20_000)
            assert "/v1/chat/completions" in browser.locator("#swagger-ui").inner_text()
            assert not browser.left and not browser.problems, (browser.left, browser.problems)


def test_secrets_stay_off_the_command_line(tmp_path):
    """The API key on `chatforge serve`'s command line shows in `ps` to every user of the machine.
    Now it comes from --api-key-file (or CHATFORGE_API_KEY): the running server's command line
    (/proc/PID/cmdline, what `ps` shows) does not hold it, and the server requires it."""
    from serve_fixtures import save_tiny_model

    model = save_tiny_model(tmp_path / "model")
    keys = tmp_path / "keys.txt"
    keys.write_text("sk-secret-from-file\n")
    keys.chmod(0o600)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("CHATFORGE_API_KEY", "CHATFORGE_ADMIN_PASSWORD")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent.parent) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen([sys.executable, "-m", "chatforge.serve.cli", str(model), "--no-db", "--device", "cpu",
                             "--port", str(port), "--api-key-file", str(keys)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        t0 = time.monotonic()
        while True:
            assert proc.poll() is None, f"the server exited: {proc.stdout.read() if proc.stdout else ''}"
            try:
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() - t0 < 120, "the server did not start"
            time.sleep(0.2)
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode()
        assert "sk-secret-from-file" not in cmdline and "keys.txt" in cmdline
        assert httpx.get(base + "/v1/models", timeout=10).status_code == 401
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer sk-secret-from-file"},
                         timeout=10).status_code == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_other_users_things_are_404_like_missing_ones(server):
    """ann1 asks for rev5's conversation. Before: 403 "conversation N belongs to another user", so
    ids told which conversations exist. Now: the same 404 as for an id that does not exist."""
    base, _ = server
    with client(base) as owner, client(base) as other:
        assert owner.post("/api/login", json={"username": "rev5", "password": PASSWORD}).status_code == 200
        conv_id = owner.post("/api/conversations", json={}).json()["id"]
        assert other.post("/api/login", json={"username": "ann1", "password": PASSWORD}).status_code == 200
        theirs, missing = other.get(f"/api/conversations/{conv_id}"), other.get(f"/api/conversations/{conv_id + 999}")
    assert theirs.status_code == missing.status_code == 404
    assert theirs.json()["error"].replace(str(conv_id), "N") == missing.json()["error"].replace(str(conv_id + 999), "N")


def test_sessions_end_when_idle_and_everywhere_at_once(server):
    """Sessions lasted 7 days with no idle timeout and no way to end the others. Now: a session's
    deadline is the idle timeout (60 min by default), moved on by each use, and
    POST /api/logout/everywhere ends every session of the user."""
    base, state = server
    with client(base) as laptop, client(base, "127.0.0.2") as phone:
        for c in (laptop, phone):
            assert c.post("/api/login", json={"username": "rev6", "password": PASSWORD}).status_code == 200
        idle = timedelta(minutes=state.settings.session_idle_minutes)
        with state.store.session(write=False) as s:
            deadlines = s.scalars(select(LoginSession.expires_at).join(User, User.id == LoginSession.user_id)
                                  .where(User.username == "rev6")).all()
        assert deadlines and all(d <= utcnow() + idle for d in deadlines)  # not 7 days
        r = laptop.post("/api/logout/everywhere", json={})
        assert r.status_code == 200 and r.json()["sessions_ended"] >= 2
        assert phone.get("/api/me").status_code == 401 and laptop.get("/api/me").status_code == 401
