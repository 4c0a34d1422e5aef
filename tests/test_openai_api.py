"""The OpenAI-compatible API over real HTTP: the official ``openai`` client, auth, limits, streaming, cancel."""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from serve_fixtures import ascii_model

from chatforge.model import GPT, generate
from chatforge.serve.app import ServeSettings, create_app, model_id_for, model_version, uvicorn_options
from chatforge.serve.cli import (
    add_serve_parser,
    default_model,
    parse_model_arg,
    run_dir_of,
    settings_from_args,
)
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.checkpoint import save_model

TOK = ByteTokenizer()
KEY = "sk-test-key"
CONTEXT = 1024


def tiny_model() -> GPT:
    return ascii_model(0, CONTEXT)


@contextlib.contextmanager
def serve(settings: ServeSettings) -> Iterator[tuple[str, object]]:
    """Run the app with uvicorn on a free loopback port in a thread; yields (base URL, app)."""
    app = create_app(settings)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           **uvicorn_options(settings)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    t0 = time.monotonic()
    while not server.started:
        assert thread.is_alive() and time.monotonic() - t0 < 20, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("runs") / "t" / "finetune" / "sft" / "model"
    save_model(d, tiny_model(), TOK, {"stage": "sft", "task": "chat"})
    (d.parent.parent.parent / "manifest.json").write_text("{}")  # what makes runs/t a run directory
    return d


@pytest.fixture(scope="module")
def access_log(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("logs") / "access.jsonl"


@pytest.fixture(scope="module")
def server(model_dir, access_log) -> Iterator[tuple[str, object]]:
    # fp32: the logprob tests compare with an fp32 forward to 1e-4 (bf16 is covered in test_engine.py)
    settings = ServeSettings(models=[(None, model_dir)], api_keys=(KEY,), device="cpu", max_body_bytes=50_000,
                             rate_limit_per_minute=0, access_log=access_log, dtype="fp32")
    with serve(settings) as running:
        yield running


@pytest.fixture(scope="module")
def url(server) -> str:
    return server[0]


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=30)


def post(url: str, path: str, body: dict, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(url + path, json=body, headers=headers, timeout=30)


def assert_openai_error(r: httpx.Response, status: int, *, param: str | None = None, code: str | None = None,
                        contains: str = "") -> None:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert contains in err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code


CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is my parcel?"}]


# --------------------------------------------------------------------------- the openai client


def test_models_list_and_ids(client, model_dir):
    assert model_id_for(model_dir) == "t-sft"
    assert model_id_for(model_dir.parent.parent.parent / "pretrain" / "model") == "t-pretrain"
    assert model_id_for(Path("/somewhere/my-model")) == "my-model"
    models = client.models.list().data
    assert [m.id for m in models] == ["t-sft"] and models[0].object == "model"
    assert client.models.retrieve("t-sft").id == "t-sft"


def test_chat_completion_and_stream_agree(client, model_dir):
    r = client.chat.completions.create(model="t-sft", messages=CHAT, max_tokens=40, temperature=0)
    text = r.choices[0].message.content
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "t-sft"
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert len(text) > 10 and r.usage.completion_tokens == 40
    assert r.usage.total_tokens == r.usage.prompt_tokens + 40
    assert r.system_fingerprint == f"fp_{model_version(model_dir)}"

    stream = client.chat.completions.create(model="t-sft", messages=CHAT, max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 40


def test_chat_stop_strings_logprobs_and_seed(client):
    full = client.chat.completions.create(model="t-sft", messages=CHAT, max_tokens=40, temperature=0)
    text = full.choices[0].message.content
    stop = text[12:15]
    r = client.chat.completions.create(model="t-sft", messages=CHAT, max_tokens=40, temperature=0, stop=[stop],
                                       logprobs=True, top_logprobs=2)
    assert r.choices[0].message.content == text[:text.find(stop)] and r.choices[0].finish_reason == "stop"
    lp = r.choices[0].logprobs.content
    assert len(lp) == r.usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in lp)
    assert all(e.token == e.top_logprobs[0].token and e.logprob <= 0 for e in lp)  # greedy: the top token
    a, b = (client.chat.completions.create(model="t-sft", messages=CHAT, max_tokens=20, temperature=1.2, seed=5)
            for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_completions_logprobs_and_echo(client):
    prompt = "Your order shipped today."
    r = client.completions.create(model="t-sft", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert r.object == "text_completion" and c.text == prompt
    assert c.logprobs.tokens == list(prompt) and c.logprobs.text_offset == list(range(len(prompt)))
    ids = [TOK.bos_id, *TOK.encode(prompt)]
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model()(torch.tensor([ids]))[0][0], dim=-1)
    want = [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))]
    assert c.logprobs.token_logprobs == pytest.approx(want, abs=1e-4)
    assert all(len(t) == 1 for t in c.logprobs.top_logprobs)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 0

    r = client.completions.create(model="t-sft", prompt=[prompt, "Hi"], max_tokens=6, temperature=0, logprobs=2,
                                  echo=True)
    assert [ch.index for ch in r.choices] == [0, 1]
    for ch, p in zip(r.choices, [prompt, "Hi"]):
        assert ch.text.startswith(p) and ch.finish_reason == "length"
        assert len(ch.logprobs.tokens) == len(p) + 6 and ch.logprobs.token_logprobs[len(p)] <= 0
        assert "".join(ch.logprobs.tokens) == ch.text  # ASCII: one character per token
        assert ch.logprobs.text_offset == list(range(len(ch.text)))
    assert r.usage.completion_tokens == 12

    stream = client.completions.create(model="t-sft", prompt="Hi", max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in stream) == r.choices[1].text[2:]


def test_tokenizer_endpoints_and_token_id_scoring_as_lm_eval_sends_them(url):
    """What lm-eval's local-completions does: its RemoteTokenizer (/tokenizer_info, /tokenize with
    add_special_tokens false), then token-id prompts with echo, logprobs 1 and max_tokens 1."""
    info = httpx.get(url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert info["eos_token"] == "<|end|>" and info["bos_token"] == "<|bos|>" and info["model_max_length"] == CONTEXT
    text = "Where is my parcel?"
    assert post(url, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"] == TOK.encode(text)
    assert post(url, "/tokenize", {"prompt": text}).json()["tokens"] == [TOK.bos_id, *TOK.encode(text)]
    assert post(url, "/tokenize", {"prompt": "<|end|>", "add_special_tokens": False}).json()["tokens"] == [TOK.end_id]
    assert post(url, "/detokenize", {"tokens": TOK.encode(text)}).json()["prompt"] == text
    assert_openai_error(post(url, "/tokenize", {"prompt": 3}), 400, param="prompt")
    assert_openai_error(post(url, "/detokenize", {"tokens": [-1]}), 400, param="tokens")
    assert post(url, "/tokenize", {"prompt": text}, key=None).status_code == 401  # guarded like /v1

    ids = [TOK.encode("Hello there"), TOK.encode("Hi")]
    r = post(url, "/v1/completions", {"model": "t-sft", "prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True,
                                      "temperature": 0, "seed": 1234})
    assert r.status_code == 200, r.text
    for choice, seq in zip(sorted(r.json()["choices"], key=lambda c: c["index"]), ids):
        lps = choice["logprobs"]["token_logprobs"]
        assert len(lps) == len(seq) + 1 and lps[0] is None  # no BOS added to token ids; one generated token
        with torch.no_grad():
            lp = torch.log_softmax(tiny_model()(torch.tensor([seq]))[0][0], dim=-1)
        assert lps[1:-1] == pytest.approx([float(lp[i - 1, seq[i]]) for i in range(1, len(seq))], abs=1e-4)
        top = choice["logprobs"]["top_logprobs"]
        assert all(len(t) == 1 and max(t.values()) >= v for t, v in zip(top[1:], lps[1:]))


def test_a_reply_ended_by_a_stop_token_lists_it_in_echoed_logprobs(tmp_path):
    """lm-eval reads token_logprobs[ctxlen:-1] of an echo + max_tokens 1 request: the last entry must be the
    generated token even when it is the stop token, or the prompt's last token is dropped."""
    from fastapi.testclient import TestClient

    d = save_model(tmp_path / "m", tiny_model(), TOK)
    app = create_app(ServeSettings(models=[(None, d)], device="cpu", dtype="fp32", rate_limit_per_minute=0,
                                   allowed_hosts=("testserver",)))
    with TestClient(app) as http:
        model = app.state.cf.model(None).engine.model
        plain = model.logits_from_hidden

        def end_first(hidden: torch.Tensor) -> torch.Tensor:  # <|end|> is always the most likely token
            logits = plain(hidden).clone()
            logits[..., TOK.end_id] = logits.max() + 5.0
            return logits

        model.logits_from_hidden = end_first
        ids = TOK.encode("Shipped today")
        body = {"prompt": ids, "max_tokens": 1, "logprobs": 1, "echo": True, "temperature": 0}
        r = http.post("/v1/completions", json=body).json()
        c = r["choices"][0]
        lp = c["logprobs"]
        assert c["finish_reason"] == "stop" and c["text"] == "Shipped today"
        assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["tokens"][-1] == "<|end|>"
        assert lp["top_logprobs"][-1] == {"<|end|>": lp["token_logprobs"][-1]}
        assert r["usage"]["completion_tokens"] == 0
        chunks = [json.loads(line[6:]) for line in http.post("/v1/completions", json={**body, "stream": True})
                  .text.splitlines() if line.startswith("data: {")]
        streamed = [t for ch in chunks for t in ((ch["choices"][0]["logprobs"] or {}).get("tokens") or [])]
        assert streamed == lp["tokens"]
        # chat answers are unchanged: the stop token is not part of the content's logprobs
        chat = http.post("/v1/chat/completions", json={"messages": CHAT, "max_tokens": 4, "logprobs": True}).json()
        assert chat["choices"][0]["logprobs"]["content"] == [] and chat["choices"][0]["finish_reason"] == "stop"


def test_frequency_and_presence_penalties_are_openais(client):
    # generated tokens only are counted, as in OpenAI's API and vLLM: the same tokens as generate()
    ids = [TOK.bos_id, *TOK.encode("Hi")]
    for f, p in ((1.5, 0.0), (0.4, 1.0), (-1.0, -2.0)):  # the last rewards repeats: it must change the text
        r = client.completions.create(model="t-sft", prompt="Hi", max_tokens=12, temperature=0, frequency_penalty=f,
                                      presence_penalty=p)
        want = generate(tiny_model(), [ids], 12, temperature=0, frequency_penalty=f, presence_penalty=p,
                        dtype="fp32")[0]
        assert r.choices[0].text == TOK.decode(want)
    plain = client.completions.create(model="t-sft", prompt="Hi", max_tokens=12, temperature=0)
    assert plain.choices[0].text != r.choices[0].text


# --------------------------------------------------------------------------- errors (httpx)


def test_missing_or_wrong_key_is_401(url):
    body = {"model": "t-sft", "messages": CHAT, "max_tokens": 2}
    assert_openai_error(post(url, "/v1/chat/completions", body, key=None), 401, code="invalid_api_key",
                        contains="missing API key")
    assert_openai_error(post(url, "/v1/chat/completions", body, key="sk-wrong"), 401, code="invalid_api_key",
                        contains="invalid API key")
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    health = httpx.get(url + "/health", timeout=10).json()  # health needs no key
    assert health["status"] == "ok" and health["models"] == ["t-sft"] and "t-sft" in health["engine"]


def test_bad_requests_are_400_naming_the_field(url):
    r = post(url, "/v1/chat/completions", {"model": "gpt-4", "messages": CHAT})
    assert_openai_error(r, 400, param="model", code="model_not_found", contains="available: t-sft")
    r = post(url, "/v1/chat/completions", {"model": "t-sft", "messages": CHAT, "n": 2})
    assert_openai_error(r, 400, param="n", contains="n=1")
    r = post(url, "/v1/chat/completions", {"model": "t-sft", "messages": CHAT, "temperature": "hot"})
    assert_openai_error(r, 400, param="temperature")
    r = post(url, "/v1/chat/completions", {"model": "t-sft", "messages": CHAT, "frequency_penalty": 2.5})
    assert_openai_error(r, 400, param="frequency_penalty", contains="[-2.0, 2.0]")
    r = post(url, "/v1/chat/completions", {"model": "t-sft", "messages": [{"role": "robot", "content": "x"}]})
    assert_openai_error(r, 400, param="messages[0].role")
    long = [{"role": "user", "content": "x" * (CONTEXT + 10)}]
    r = post(url, "/v1/chat/completions", {"model": "t-sft", "messages": long})
    assert_openai_error(r, 400, code="context_length_exceeded", contains=f"at most {CONTEXT} prompt tokens")
    r = post(url, "/v1/completions", {"model": "t-sft", "prompt": "x" * 1000, "max_tokens": 100})
    assert_openai_error(r, 400, code="context_length_exceeded", contains=f"maximum context length is {CONTEXT}")
    r = httpx.post(url + "/v1/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_openai_error(r, 400, contains="not valid JSON")


def test_body_too_large_is_413(url):
    body = {"model": "t-sft", "prompt": "x" * 60_000}
    assert_openai_error(post(url, "/v1/completions", body), 413, code="request_too_large", contains="50000")

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit is counted while reading
        yield b'{"model": "t-sft", "prompt": "'
        for _ in range(10):
            yield b"y" * 10_000
        yield b'"}'

    r = httpx.post(url + "/v1/completions", content=chunked(), timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert_openai_error(r, 413, code="request_too_large")


def test_disconnect_mid_stream_cancels_the_request(server):
    url, app = server
    model = app.state.cf.models["t-sft"].engine.model
    forward = model.forward_hidden

    def slow(idx, **kw):  # 900 tokens now take several seconds: the disconnect surely comes first
        time.sleep(0.005)
        return forward(idx, **kw)

    model.forward_hidden = slow
    try:
        check_disconnect_cancels(url)
    finally:
        del model.forward_hidden


def check_disconnect_cancels(url: str) -> None:
    before = httpx.get(url + "/health", timeout=10).json()["engine"]["t-sft"]
    body = {"model": "t-sft", "messages": CHAT, "max_tokens": 900, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = r.iter_lines()
        got: list[dict] = []
        for line in lines:
            if line.startswith("data: {"):
                got.append(json.loads(line[6:]))
            if len(got) >= 5:
                break
    assert got[0]["choices"][0]["delta"]["role"] == "assistant"
    t0 = time.monotonic()
    while True:
        stats = httpx.get(url + "/health", timeout=10).json()["engine"]["t-sft"]
        if stats["running"] == 0 and stats["requests_cancelled"] > before["requests_cancelled"]:
            break
        assert time.monotonic() - t0 < 10, stats
        time.sleep(0.02)
    assert stats["tokens_generated"] - before["tokens_generated"] < 900


def test_access_log_has_one_json_line_per_request_and_no_keys(url, access_log, client):
    client.models.list()
    time.sleep(0.1)
    lines = [json.loads(line) for line in access_log.read_text().splitlines()]
    assert lines, "no access log lines"
    for rec in lines:
        assert set(rec) == {"time", "method", "path", "status", "duration_ms", "client", "key_id", "tokens"}
    assert KEY not in access_log.read_text()
    ok = [r for r in lines if r["path"] == "/v1/chat/completions" and r["status"] == 200]
    assert ok and all(r["key_id"].startswith("key:") and r["client"] == "127.0.0.1" for r in ok)
    assert any(r["tokens"] for r in ok)
    assert any(r["status"] == 401 and r["key_id"] is None for r in lines)


# --------------------------------------------------------------------------- rate limit and full queue


def test_rate_limit_429_and_full_queue_503(model_dir):
    settings = ServeSettings(models=[("small", model_dir)], api_keys=("a", "b"), device="cpu", max_batch=1,
                             max_queue=0, rate_limit_per_minute=3)
    with serve(settings) as (url, app):
        # key "a": hold the engine between steps (its model lock) so the one admitted request keeps the only
        # slot; a second request finds no room -> 503
        engine = app.state.cf.models["small"].engine
        results: list[httpx.Response] = []
        body = {"model": "small", "prompt": "Hi", "max_tokens": 5, "temperature": 0}
        with engine._model_lock:
            first = threading.Thread(target=lambda: results.append(post(url, "/v1/completions", body, key="a")))
            first.start()
            t0 = time.monotonic()
            while engine.stats()["running"] < 1:
                assert time.monotonic() - t0 < 10
                time.sleep(0.01)
            busy = post(url, "/v1/completions", body, key="a")
        first.join(10)
        assert_openai_error(busy, 503, code="engine_overloaded", contains="busy")
        assert busy.headers["retry-after"] == "1"
        assert results[0].status_code == 200 and results[0].json()["usage"]["completion_tokens"] == 5
        # key "b" has its own bucket: 3 requests pass, the 4th is limited
        codes = [httpx.get(url + "/v1/models", headers={"Authorization": "Bearer b"}, timeout=10) for _ in range(4)]
        assert [c.status_code for c in codes] == [200, 200, 200, 429]
        assert_openai_error(codes[-1], 429, code="rate_limit_exceeded", contains="3 requests per minute")
        assert int(codes[-1].headers["retry-after"]) >= 1


# --------------------------------------------------------------------------- the command line


def test_serve_arguments(tmp_path, model_dir, monkeypatch):
    assert parse_model_arg("base=some/dir") == ("base", Path("some/dir"))
    assert parse_model_arg("some/dir") == (None, Path("some/dir"))
    run = model_dir.parent.parent.parent
    assert run_dir_of(model_dir) == run and run_dir_of(tmp_path) is None
    assert default_model(run) == model_dir
    with pytest.raises(Exception, match="chatforge pipeline run"):
        default_model(tmp_path)

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers())
    monkeypatch.setenv("CHATFORGE_API_KEY", "env-key")
    monkeypatch.setenv("CHATFORGE_ADMIN_PASSWORD", "secret-pw")
    args = parser.parse_args(["serve", f"mine={model_dir}", "--no-db", "--api-key", "k1", "--rate-limit", "0"])
    s = settings_from_args(args)
    assert s.models == [("mine", model_dir)] and s.db_url is None and s.api_keys == ("k1", "env-key")
    assert s.rate_limit_per_minute == 0 and s.admin_password == "secret-pw" and s.max_batch == 16
    with pytest.raises(Exception, match="--max-batch must be >= 1"):
        settings_from_args(parser.parse_args(["serve", str(model_dir), "--no-db", "--max-batch", "0"]))


def test_streamed_text_chunk_template_renders_exactly_the_chunk():
    from chatforge.serve.openai_api import _MARK, _sse, _text_chunk_template

    head = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "system_fingerprint": "fp"}

    def chunk(delta: dict, usage: bool) -> str:
        c = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}]}
        if usage:
            c["usage"] = None
        return _sse(c)

    for usage in (False, True):
        render = _text_chunk_template(chunk({"content": _MARK}, usage))
        for text in ["hi", 'a "quote" \\ back', "line\nbreak\u2028sep", "é ✓ 中文", " "]:
            assert render(text) == chunk({"content": text}, usage)
