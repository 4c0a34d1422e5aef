"""``chatforge serve``: models behind the OpenAI-compatible API and the feedback web app.

    chatforge serve                                   # runs/default's @champion (else its newest chat model)
    chatforge serve default@challenger                # a registered alias or version (chatforge models)
    chatforge serve --name mine                       # ... of runs/mine, with runs/mine/feedback.db
    chatforge serve runs/default/finetune/sft/model runs/default/pretrain/model
    chatforge serve base=path/to/a sft=path/to/b --api-key-file keys.txt --host 0.0.0.0 --allowed-hosts chat.lan

MODEL is a model directory, ``NAME@ALIAS`` or a registered version, or NAME=any of
those. Without one, the run's (``--name``, default ``default``, under ``--runs-dir``,
default ``runs``) ``@champion`` is served; when none is promoted, its newest aligned
chat model, else its newest chat model, else its pre-trained model. The
feedback database is that run's ``feedback.db`` (with MODELs and no ``--name``: the
run of the first model); ``--no-db`` serves the API only.

Secrets: API keys from ``--api-key-file`` (one per line) or ``CHATFORGE_API_KEY``
(comma-separated), the admin's first password from ``CHATFORGE_ADMIN_PASSWORD``.
``--api-key`` and ``--admin-password`` still work but warn: any user of the machine
sees a command line in ``ps``. Without any key the API needs none: keep the default
loopback host then.

Browsers reach the server by IP address or ``localhost``; other names must be listed
with ``--allowed-hosts`` (a DNS-rebinding defence). Behind a reverse proxy, name it in
``--forwarded-allow-ips`` so its ``X-Forwarded-For`` gives the client's address (the
rate limits and the login throttle count per address); no one else's is believed.
Safety: ``--guard POLICY`` (a policy TOML file, or ``default`` for the shipped one) checks every
prompt and every answer against the policy while it streams (``chatforge.serve.guard``): what it
refuses never reaches the client, and every flagged exchange goes to the review queue (the Flags
page). Serving is unguarded unless ``--guard`` is given (a research server scores raw model
output); ``--no-guard`` says so explicitly.

``python -m chatforge.serve.cli`` runs the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import stat
import sys
from pathlib import Path
from typing import Any

from chatforge.config import QUANTIZE_CHOICES
from chatforge.errors import ChatforgeError
from chatforge.paths import RunPaths, stage_of_model_dir

LOOPBACK = ("127.0.0.1", "localhost", "::1")
DEFAULT_RUNS_DIR, DEFAULT_RUN = "runs", "default"


def _csv(values: list[str]) -> tuple[str, ...]:
    """Repeatable, comma-separated flag values -> one tuple (in order, without repeats)."""
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
    return tuple(dict.fromkeys(items))


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``chatforge`` subcommands (``sub`` from ``add_subparsers``)."""
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible API and the feedback web app",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="model directory, NAME@ALIAS, a version, or NAME=one of those (default: the run's @champion)")
    p.add_argument("--name", help=f"the run whose model and feedback database are used (default: {DEFAULT_RUN})")
    p.add_argument("--runs-dir", help=f"directory holding runs (default: {DEFAULT_RUNS_DIR})")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    db = p.add_mutually_exclusive_group()
    db.add_argument("--db", metavar="URL",
                    help="feedback database (SQLAlchemy URL; default: sqlite:///RUN_DIR/feedback.db)")
    db.add_argument("--no-db", action="store_true", help="serve the API only, without the web app")
    p.add_argument("--api-key-file", metavar="FILE",
                   help="require the keys in FILE (one per line, # comments) on /v1; also CHATFORGE_API_KEY")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require this key on /v1 (repeatable); shows in `ps`: prefer --api-key-file")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per model")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503s")
    p.add_argument("--rate-limit", type=int, default=120, metavar="N",
                   help="requests per minute per API key or client address (0 = no rate limit at all)")
    p.add_argument("--rate-limit-tokens", type=int, default=200_000, metavar="N",
                   help="tokens per minute per API key or client address, counting prompt + max_tokens for "
                        "each prompt (0 = off)")
    p.add_argument("--max-prompts", type=int, default=32, metavar="N",
                   help="prompts per /v1/completions request")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--allowed-hosts", action="append", default=[], metavar="NAMES",
                   help="Host names to answer besides IP addresses and localhost (comma-separated, "
                        "repeatable; *.example.com for subdomains, * for any)")
    p.add_argument("--forwarded-allow-ips", action="append", default=[], metavar="IPS",
                   help="reverse proxies whose X-Forwarded-For/-Proto are believed (comma-separated; "
                        "default: none, the client is the socket's peer)")
    p.add_argument("--docs", action="store_true",
                   help="serve the API schema at /docs (Swagger UI from this machine) and /openapi.json")
    p.add_argument("--session-idle-minutes", type=int, default=60,
                   help="a web login unused this long ends (default 60; it lasts 7 days at most)")
    p.add_argument("--access-log", metavar="FILE", help="JSON lines access log (default: to the console)")
    p.add_argument("--admin-password",
                   help="create user 'admin' with this password if there is no admin yet; shows in `ps`: "
                        "prefer the CHATFORGE_ADMIN_PASSWORD environment variable")
    guard = p.add_mutually_exclusive_group()
    guard.add_argument("--guard", metavar="POLICY",
                       help="check prompts and answers against a safety policy: a TOML file, or 'default' for "
                            "the shipped policy (refuses, redacts and flags while streaming; flags go to the "
                            "review queue)")
    guard.add_argument("--no-guard", action="store_true",
                       help="serve unguarded (the default): raw model output, e.g. for research and scoring")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="forward precision: auto = bf16 autocast on GPUs and AMX CPUs, else fp32")
    p.add_argument("--threads", type=int, default=0,
                   help="PyTorch threads for the models on a CPU (0 = auto: one core left for the HTTP server, "
                        "so 1 on a 2-core machine)")
    p.add_argument("--quantize", default="none", choices=QUANTIZE_CHOICES,
                   help="int8: the models' matrices in int8 (CPU; decoding reads a quarter of the bytes; "
                        "runs fp32 around them); the README states its measured quality cost")
    p.add_argument("--compile", action="store_true",
                   help="compile each model's prompt forward (prefill) for a few length buckets before serving: "
                        "about a minute at the first start on a 2-core CPU (cached on disk after); a 185-token "
                        "prefill of the tiny model then takes 3.1 ms instead of 7.2; int8 models cannot")
    p.set_defaults(func=cmd_serve)
    return p


# --------------------------------------------------------------------------- resolving arguments


def parse_model_arg(arg: str) -> tuple[str | None, Path]:
    """``NAME=DIR`` or ``DIR`` (a directory whose name contains '=' stays a directory)."""
    name, sep, path = arg.partition("=")
    if sep and name and path and not Path(arg).exists() and "/" not in name:
        return name, Path(path)
    return None, Path(arg)


def run_of(args: argparse.Namespace) -> RunPaths:
    """The run named by ``--name`` / ``--runs-dir`` (default ``runs/default``)."""
    return RunPaths.of(getattr(args, "runs_dir", None) or DEFAULT_RUNS_DIR, getattr(args, "name", None) or DEFAULT_RUN)


def registered_dir(path: Path, run: RunPaths) -> Path:
    """``NAME@ALIAS``, ``@ALIAS`` or a registered version -> its model directory; any other path as given."""
    from chatforge.registry import registered_model_dir

    return registered_model_dir(str(path), run.root.parent, run.name) or path


def default_model(run: RunPaths | Path) -> Path:
    """What ``serve`` serves without a MODEL: the run's ``@champion`` in the registry; else its newest aligned
    chat model (a stage under ``align/``), else its newest chat model, else its pre-trained model."""
    from chatforge.registry import CHAMPION, Registry

    run = run if isinstance(run, RunPaths) else RunPaths(Path(run))
    reg = Registry(run.root.parent)
    champion = reg.aliases(run.name).get(CHAMPION)
    if champion is not None:
        return reg.path_of(champion)
    chats = []
    for directory in run.model_dirs():
        try:
            meta = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("task") == "chat" and meta.get("architecture", "gpt") == "gpt":
            aligned = directory.parent.parent.name == "align"
            chats.append((aligned, directory.stat().st_mtime_ns, directory))
    if chats:
        return max(chats)[2]
    pretrain = run.pretrain.model
    if (pretrain / "config.json").is_file():
        return pretrain
    what = "does not exist" if not run.root.is_dir() else f"has no chat model and no {pretrain}"
    raise ChatforgeError(f"no model to serve: run {run.name!r} ({run.root}) {what}; run "
                         f"`chatforge pipeline run --name {run.name}` first, or give a model directory")


def run_dir_of(model: Path) -> Path | None:
    """The run directory of a run's model directory (a stage's ``model/`` or ``versions/<v>/``), else None."""
    located = stage_of_model_dir(model)
    return located[0] if located else None


def read_key_file(path: Path) -> list[str]:
    """API keys from a file: one per line; blank lines and ``#`` comments are skipped."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        mode = Path(path).stat().st_mode
    except OSError as e:
        raise ChatforgeError(f"--api-key-file {path}: cannot read it: {e.strerror or e}") from e
    keys = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ChatforgeError(f"--api-key-file {path}: holds no key (one per line)")
    if mode & (stat.S_IRGRP | stat.S_IROTH):
        _warn(f"--api-key-file {path} is readable by other users of this machine; chmod 600 it")
    return keys


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def settings_from_args(args: argparse.Namespace) -> Any:
    """``ServeSettings`` from parsed arguments and the environment (warnings go to stderr)."""
    from chatforge.serve.state import ServeSettings

    named = bool(args.name or args.runs_dir)
    run = run_of(args)
    models = [(name, registered_dir(path, run)) for name, path in map(parse_model_arg, args.models)]
    if models and not named:  # the database of the first model's run
        db_run = run_dir_of(models[0][1]) or run.root
    else:
        db_run = run.root
        models = models or [(None, default_model(run))]

    keys = [k for k in args.api_key if k]
    if keys:
        _warn("--api-key puts the key on the command line, where `ps` and shell history show it to other "
              "users of this machine; prefer --api-key-file FILE or CHATFORGE_API_KEY")
    if args.api_key_file:
        keys += read_key_file(Path(args.api_key_file))
    keys += [k.strip() for k in os.environ.get("CHATFORGE_API_KEY", "").split(",") if k.strip()]
    if args.admin_password:
        _warn("--admin-password puts the password on the command line, where `ps` and shell history show it "
              "to other users of this machine; prefer CHATFORGE_ADMIN_PASSWORD")
    db_url = None
    if args.db:
        db_url = args.db
    elif not args.no_db:
        if db_run.is_dir():
            db_url = f"sqlite:///{RunPaths(db_run).feedback_db}"
        elif named:
            raise ChatforgeError(f"run {run.name!r} does not exist ({run.root}): no feedback database to open; "
                                 "give --db URL or --no-db")
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--rate-limit", args.rate_limit, 0), ("--max-body-bytes", args.max_body_bytes, 0),
                             ("--rate-limit-tokens", args.rate_limit_tokens, 0), ("--max-prompts", args.max_prompts, 1),
                             ("--session-idle-minutes", args.session_idle_minutes, 1), ("--port", args.port, 0)):
        if value < low:
            raise ChatforgeError(f"{flag} must be >= {low}, got {value}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ChatforgeError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    guard_policy = None
    if getattr(args, "guard", None) and not getattr(args, "no_guard", False):
        from chatforge.safety.policy import load_policy

        load_policy(args.guard)  # a bad file fails now, naming the file and field, before any model loads
        guard_policy = args.guard
    allowed = _csv(args.allowed_hosts)
    if args.host not in LOOPBACK and args.host not in ("0.0.0.0", "::"):
        allowed = tuple(dict.fromkeys((*allowed, args.host)))  # the name it was told to listen on is its own
    return ServeSettings(
        models=models, db_url=db_url, api_keys=tuple(dict.fromkeys(keys)), max_batch=args.max_batch,
        max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
        rate_limit_per_minute=args.rate_limit, rate_limit_tokens_per_minute=args.rate_limit_tokens,
        max_prompts_per_request=args.max_prompts, allowed_hosts=allowed,
        forwarded_allow_ips=_csv(args.forwarded_allow_ips), docs=args.docs,
        session_idle_minutes=args.session_idle_minutes,
        access_log=Path(args.access_log) if args.access_log else None,
        device=args.device, dtype=args.dtype, quantize=args.quantize, compile=args.compile,
        admin_password=args.admin_password or os.environ.get("CHATFORGE_ADMIN_PASSWORD") or None,
        guard_policy=guard_policy,
    )


# --------------------------------------------------------------------------- the command


def _set_cpu_threads(threads: int) -> int:
    """Set PyTorch's intra-op threads for this process; returns the count.

    The engine's thread and the HTTP event loop share the process: when the model takes every
    core, each decode step's small ops fight the loop for CPU and the GIL. Measured on 2 cores
    (the tiny SupportWorld model, 16 concurrent requests, in-process engine): 1 thread gave
    2,206 tokens/s and 2 threads 1,497; one stream 451 vs 317."""
    import os

    import torch

    if threads < 0:
        raise ChatforgeError(f"--threads must be >= 0 (0 = auto), got {threads}")
    n = threads or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(n)
    return n


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from chatforge.serve.app import create_app, uvicorn_options

    settings = settings_from_args(args)
    threads = _set_cpu_threads(args.threads)
    app = create_app(settings)
    state = app.state.cf
    if settings.access_log is None:
        access = logging.getLogger("chatforge.access")
        if not access.handlers:
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(message)s"))
            access.addHandler(handler)
        access.setLevel(logging.INFO)
        access.propagate = False
    host = f"[{args.host}]" if ":" in args.host else args.host
    base = f"http://{host}:{args.port}"
    for m in state.models.values():
        print(f"model {m.id}: {m.path} (version {m.version}, context {m.context} tokens)")
    print(f"PyTorch CPU threads: {threads}")
    for m in state.models.values():
        if m.engine.compile:
            print(f"model {m.id}: compiling the prefill for prompt-length buckets ...", flush=True)
            seconds = m.engine.warm_up()
            print(f"model {m.id}: prefill compiled in {seconds:.1f} s")
    key_note = "API key required" if settings.api_keys else "no API key required"
    print(f"OpenAI-compatible API: {base}/v1 ({key_note})")
    if settings.db_url:
        print(f"web app: open {base}/ (database {state.store.safe_url})")  # never the password
    else:
        print(f"open {base}/health to check the server (API only: no database)")
    if args.host not in LOOPBACK and not settings.api_keys:
        _warn(f"listening on {args.host} without an API key: anyone who can reach this machine can use "
              "the API; pass --api-key-file FILE")
    if args.host not in LOOPBACK and not args.allowed_hosts:
        print("note: browsers must use this machine's IP address (or localhost); pass --allowed-hosts NAME "
              "for each name people type", file=sys.stderr)
    if settings.docs:
        print(f"API schema: {base}/docs")
    if state.guard is not None:
        print(f"safety guard: {state.guard.describe()}, answers held back {state.guard.policy.stream_window} "
              "characters while streaming")
    else:
        print("safety guard: off (pass --guard default to check prompts and answers)")
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", **uvicorn_options(settings))


def main(argv: list[str] | None = None) -> int:
    """``python -m chatforge.serve.cli``: the serve command on its own."""
    parser = argparse.ArgumentParser(prog="chatforge")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["serve", *(sys.argv[1:] if argv is None else argv)])
    try:
        args.func(args)
    except ChatforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
