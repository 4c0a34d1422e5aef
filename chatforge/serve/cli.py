"""``chatforge serve``: models behind the OpenAI-compatible API and the feedback web app.

    chatforge serve                                   # the newest chat model of runs/default
    chatforge serve runs/default/finetune/sft/model runs/default/pretrain/model
    chatforge serve base=path/to/a sft=path/to/b --api-key sk-... --host 0.0.0.0

MODEL is a model directory or NAME=DIR. Without one, the newest chat model of
the default run is served (a ``finetune/*/model`` whose task is chat, else the
pre-trained model). The feedback database defaults to ``feedback.db`` in the run
directory of the first model; ``--no-db`` serves the API only.

Without ``--api-key`` (or ``CHATFORGE_API_KEY``) the API needs no key: keep the
default loopback host then. ``python -m chatforge.serve.cli`` runs the same command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from chatforge.errors import ChatforgeError

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``chatforge`` subcommands (``sub`` from ``add_subparsers``)."""
    p = sub.add_parser("serve", help="serve models over an OpenAI-compatible API and the feedback web app",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("models", nargs="*", metavar="MODEL",
                   help="model directory or NAME=DIR (default: the newest chat model of runs/default)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000)
    db = p.add_mutually_exclusive_group()
    db.add_argument("--db", metavar="URL",
                    help="feedback database (SQLAlchemy URL; default: sqlite:///RUN_DIR/feedback.db)")
    db.add_argument("--no-db", action="store_true", help="serve the API only, without the web app")
    p.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="require this key on /v1 (repeatable; also CHATFORGE_API_KEY, comma-separated)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together per model")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot before 503s")
    p.add_argument("--rate-limit", type=int, default=120, metavar="N",
                   help="requests per minute per API key or client IP (0 = off)")
    p.add_argument("--max-prompt-tokens", type=int, default=None, help="default: the model's context")
    p.add_argument("--max-body-bytes", type=int, default=1_000_000)
    p.add_argument("--access-log", metavar="FILE", help="JSON lines access log (default: to the console)")
    p.add_argument("--admin-password",
                   help="create user 'admin' with this password if there is no admin yet "
                        "(prefer the CHATFORGE_ADMIN_PASSWORD environment variable)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="forward precision: auto = bf16 autocast where the device runs bf16 natively, else fp32")
    p.set_defaults(func=cmd_serve)
    return p


# --------------------------------------------------------------------------- resolving arguments


def parse_model_arg(arg: str) -> tuple[str | None, Path]:
    """``NAME=DIR`` or ``DIR`` (a directory whose name contains '=' stays a directory)."""
    name, sep, path = arg.partition("=")
    if sep and name and path and not Path(arg).exists() and "/" not in name:
        return name, Path(path)
    return None, Path(arg)


def default_run_dir() -> Path:
    from chatforge.config import load_config

    return load_config(None, preset=None).run_dir


def default_model(run_dir: Path) -> Path:
    """The newest fine-tuned chat model of ``run_dir``, else its pre-trained model."""
    chats = []
    for cfg in sorted((run_dir / "finetune").glob("*/model/config.json")):
        try:
            meta = json.loads(cfg.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue
        if meta.get("task") == "chat" and meta.get("architecture", "gpt") == "gpt":
            chats.append((cfg.stat().st_mtime, cfg.parent))
    if chats:
        return max(chats)[1]
    pretrain = run_dir / "pretrain" / "model"
    if (pretrain / "config.json").is_file():
        return pretrain
    raise ChatforgeError(f"no model to serve: neither {run_dir / 'finetune' / 'sft' / 'model'} nor {pretrain} "
                         "exists; run `chatforge pipeline run` first, or give a model directory")


def run_dir_of(model: Path) -> Path | None:
    """``runs/<run>`` for a run's model directory, else None."""
    parts = Path(os.path.abspath(model)).parts
    if len(parts) >= 4 and parts[-1] == "model" and parts[-3] == "finetune":
        return Path(*parts[:-3])
    if len(parts) >= 3 and parts[-1] == "model" and parts[-2] == "pretrain":
        return Path(*parts[:-2])
    return None


def settings_from_args(args: argparse.Namespace) -> Any:
    """``ServeSettings`` from parsed arguments and the environment."""
    from chatforge.serve.app import ServeSettings

    models = [parse_model_arg(a) for a in args.models]
    if not models:
        models = [(None, default_model(default_run_dir()))]
    keys = [k for k in args.api_key if k]
    keys += [k.strip() for k in os.environ.get("CHATFORGE_API_KEY", "").split(",") if k.strip()]
    db_url = None
    if args.db:
        db_url = args.db
    elif not args.no_db:
        run_dir = run_dir_of(models[0][1]) or default_run_dir()
        if run_dir.is_dir():
            from chatforge.store.db import default_db_url

            db_url = default_db_url(run_dir)
    for flag, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--rate-limit", args.rate_limit, 0), ("--max-body-bytes", args.max_body_bytes, 0),
                             ("--port", args.port, 0)):
        if value < low:
            raise ChatforgeError(f"{flag} must be >= {low}, got {value}")
    if args.max_prompt_tokens is not None and args.max_prompt_tokens < 1:
        raise ChatforgeError(f"--max-prompt-tokens must be >= 1, got {args.max_prompt_tokens}")
    return ServeSettings(
        models=models, db_url=db_url, api_keys=tuple(dict.fromkeys(keys)), max_batch=args.max_batch,
        max_queue=args.max_queue, max_prompt_tokens=args.max_prompt_tokens, max_body_bytes=args.max_body_bytes,
        rate_limit_per_minute=args.rate_limit, access_log=Path(args.access_log) if args.access_log else None,
        device=args.device, dtype=args.dtype, admin_password=args.admin_password or os.environ.get("CHATFORGE_ADMIN_PASSWORD") or None,
    )


# --------------------------------------------------------------------------- the command


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from chatforge.serve.app import create_app

    settings = settings_from_args(args)
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
    key_note = "API key required" if settings.api_keys else "no API key required"
    print(f"OpenAI-compatible API: {base}/v1 ({key_note})")
    if settings.db_url:
        print(f"web app: open {base}/ (database {settings.db_url})")
    else:
        print(f"open {base}/health to check the server (API only: no database)")
    if args.host not in LOOPBACK and not settings.api_keys:
        print(f"warning: listening on {args.host} without an API key: anyone who can reach this machine can use "
              "the API; pass --api-key", file=sys.stderr)
    sys.stdout.flush()
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


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
