"""Shared pieces for the web app tests: a tiny saved model, the app over a temp SQLite
database, users of every role, and a live uvicorn server in a thread (for the browser).

The model is a 2-layer, 32-wide GPT on the byte tokenizer: untrained, so it writes
random bytes, but it exercises the real path (model directory -> engine -> SSE -> store)
in well under a second per answer on a CPU.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from chatforge.model.gpt import GPT, GPTConfig
from chatforge.serve.app import ServeSettings, create_app, uvicorn_options
from chatforge.store import service
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.checkpoint import save_model

ADMIN_PASSWORD = "admin-secret-1"
PASSWORD = "pw-for-tests-1"
# username -> role; every one has PASSWORD (the admin "admin" is created by create_app)
USERS = {"rev1": "reviewer", "rev2": "reviewer", "ann1": "annotator", "ann2": "annotator"}
CONTEXT = 256


def ascii_model(seed: int = 0, block_size: int = 128, **kw: Any) -> GPT:
    """Random weights everywhere; the LM head can only favour ASCII bytes (special tokens and bytes
    >= 128 get logit 0 while ASCII logits spread widely), so greedy text is readable ASCII that never
    hits a stop token: outputs are long and stop strings can be chosen from them."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocab_size=ByteTokenizer().vocab_size, block_size=block_size, n_layer=2, n_embd=32,
                          n_head=4, **kw))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
        model.output_weight[:128].normal_(0.0, 1.0)
        model.output_weight[128:] = 0.0
    return model.eval()


def save_tiny_model(directory: Path, seed: int = 0, context: int = CONTEXT) -> Path:
    """A saved, untrained 2-layer GPT on the byte tokenizer."""
    torch.manual_seed(seed)
    tok = ByteTokenizer()
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=context, n_layer=2, n_embd=32, n_head=2))
    model.init_weights()
    return save_model(directory, model, tok, meta={"stage": "test"})


def settings_for(tmp: Path, models: list[tuple[str | None, Path]], **overrides: Any) -> ServeSettings:
    # "testserver" is the Host header of FastAPI's TestClient; a live server is reached at 127.0.0.1
    fields: dict[str, Any] = dict(models=models, db_url=f"sqlite:///{tmp / 'feedback.db'}",
                                  admin_password=ADMIN_PASSWORD, rate_limit_per_minute=0, max_batch=8,
                                  device="cpu", allowed_hosts=("testserver",))
    fields.update(overrides)
    return ServeSettings(**fields)


def build_app(tmp: Path, n_models: int = 1, **overrides: Any):
    """``(app, settings)`` for ``n_models`` tiny models (ids tiny-a, tiny-b, ...) and a fresh DB."""
    models = []
    for i in range(n_models):
        name = f"tiny-{chr(ord('a') + i)}"
        models.append((name, save_tiny_model(tmp / "models" / name, seed=i)))
    settings = settings_for(tmp, models, **overrides)
    return create_app(settings), settings


def add_users(state: Any) -> None:
    for username, role in USERS.items():
        service.create_user(state.store, username, PASSWORD, role)


def slow_down(state: Any, seconds: float) -> None:
    """Sleep ``seconds`` in every forward of every served model, so a stream takes visible time."""
    for served in state.models.values():
        served.engine.model.blocks[0].register_forward_pre_hook(lambda module, args: time.sleep(seconds))


def never_stop(state: Any) -> None:
    """Make every served model unable to end its turn (special tokens get -inf logits), so an
    answer runs to max_tokens unless it is cancelled."""
    for served in state.models.values():
        model, tok = served.engine.model, served.engine.tokenizer
        special = torch.tensor(sorted(tok.special_tokens.values()))
        plain = model.logits_from_hidden

        def masked(hidden: torch.Tensor, plain=plain, special=special) -> torch.Tensor:
            logits = plain(hidden).clone()
            logits[..., special.to(logits.device)] = float("-inf")
            return logits

        model.logits_from_hidden = masked


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Run ``app`` with uvicorn on a free loopback port in a thread, configured as ``chatforge serve``
    configures it (``uvicorn_options``: which proxy headers are believed); yields the base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="on", access_log=False,
                                           **uvicorn_options(app.state.cf.settings)))
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def read_sse(lines: Iterator[str]) -> list[dict]:
    """The JSON events of a ``data: {...}`` event stream."""
    import json

    events = []
    for line in lines:
        if line.startswith("data:"):
            events.append(json.loads(line[5:].strip()))
    return events
