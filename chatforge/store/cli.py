"""``chatforge feedback ...``: manage the feedback store from the shell.

    chatforge feedback export [--db URL | --run NAME] --out DIR [--kind K ...] [--min-rating X]
    chatforge feedback export --kind moderation --out DIR   (reviewed safety flags as {"text", "label"})
    chatforge feedback users add USERNAME --role R [--password P]   (asks for it if not given)
    chatforge feedback users list
    chatforge feedback users set-role USERNAME ROLE
    chatforge feedback import NAME FILE.jsonl --kind prompts|items [--user ADMIN]
    chatforge feedback stats [--dataset NAME] [--baseline MODEL@VERSION] [--json]
    chatforge feedback db upgrade

Every command takes ``--db URL`` (any SQLAlchemy URL) or ``--run NAME`` (the run's
``runs/NAME/feedback.db``); the default is the default run's database, the one
``chatforge serve`` uses. ``add_feedback_parser(sub)`` hangs these on the main parser.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from chatforge.errors import ChatforgeError
from chatforge.io import MAX_JSON_DEPTH, read_jsonl
from chatforge.store.constants import ALL_EXPORT_KINDS, ROLES

if TYPE_CHECKING:
    from chatforge.store.db import Store

DEFAULT_RUNS_DIR = Path("runs")
PASSWORD_ENV = "CHATFORGE_PASSWORD"


def _db_args(p: argparse.ArgumentParser) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument("--db", help="database URL, e.g. sqlite:///path/feedback.db or postgresql+psycopg://... "
                                    "(default: the default run's feedback.db)")
    where.add_argument("--run", help="use runs/RUN/feedback.db")
    p.add_argument("--runs-dir", default=str(DEFAULT_RUNS_DIR), help="directory holding runs (default: runs)")


def db_url_from_args(args: argparse.Namespace) -> str:
    """``--db`` as given, else the SQLite file of ``--run`` (default: ``default``)."""
    if getattr(args, "db", None):
        return args.db
    from chatforge.store.db import default_db_url

    return default_db_url(Path(args.runs_dir) / (args.run or "default"))


def _open(args: argparse.Namespace) -> Store:
    from chatforge.store.db import Store

    return Store(db_url_from_args(args))


def cmd_export(args: argparse.Namespace) -> None:
    store = _open(args)
    try:
        from chatforge.store.export import export_feedback

        counts = export_feedback(store, Path(args.out), kinds=args.kind or ALL_EXPORT_KINDS,
                                 min_rating=args.min_rating)
    finally:
        store.close()
    for kind, n in counts.items():
        print(f"{Path(args.out) / f'{kind}.jsonl'}: {n} rows")


def _read_password(args: argparse.Namespace) -> str:
    if args.password is not None:
        return args.password
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    if not sys.stdin.isatty():
        raise ChatforgeError(f"no password: pass --password, set {PASSWORD_ENV}, or run in a terminal to be asked")
    first = getpass.getpass(f"password for {args.username}: ")
    if first != getpass.getpass("again: "):
        raise ChatforgeError("the two passwords differ; nothing was changed")
    return first


def cmd_users_add(args: argparse.Namespace) -> None:
    from chatforge.store.service import create_user

    password = _read_password(args)
    store = _open(args)
    try:
        user = create_user(store, args.username, password, args.role)
    finally:
        store.close()
    print(f"created user {user['username']!r} (id {user['id']}, role {user['role']})")


def cmd_users_key(args: argparse.Namespace) -> None:
    from chatforge.store.service import create_api_key, list_users

    store = _open(args)
    try:
        user = next((u for u in list_users(store) if u["username"] == args.username), None)
        if user is None:
            raise ChatforgeError(f"no user {args.username!r} in {store.safe_url}; add one with "
                                 f"`chatforge feedback users add {args.username} --role ...`")
        key = create_api_key(store, user["id"])
    finally:
        store.close()
    print(key)
    print(f"API key for {args.username!r}: shown once, only its hash is stored. `chatforge serve` accepts it "
          f"whenever the API asks for keys (any --api-key or CHATFORGE_API_KEY given).", file=sys.stderr)


def cmd_users_set_role(args: argparse.Namespace) -> None:
    from chatforge.store.service import NotFound, set_role

    store = _open(args)
    try:
        user = set_role(store, args.username, args.role)
    except NotFound as e:
        raise ChatforgeError(f"{e} in {store.safe_url}; list them with `chatforge feedback users list`") from e
    finally:
        store.close()
    print(f"user {user['username']!r} is now {user['role']}")


def cmd_users_list(args: argparse.Namespace) -> None:
    from chatforge.store.service import list_users

    store = _open(args)
    try:
        users = list_users(store)
    finally:
        store.close()
    if not users:
        print("no users yet: add one with `chatforge feedback users add NAME --role admin`")
        return
    width = max(len(u["username"]) for u in users)
    for u in users:
        print(f"{u['id']:>5}  {u['username']:<{width}}  {u['role']:<9}  {u['created_at']}")


def cmd_import(args: argparse.Namespace) -> None:
    from chatforge.store.service import Invalid, import_dataset, list_users

    path = Path(args.file)
    lines, rows = [], []
    for lineno, obj in read_jsonl(path, max_depth=MAX_JSON_DEPTH):  # nested deeper: an error naming file:line
        lines.append(lineno)
        rows.append(obj)
    if not rows:
        raise ChatforgeError(f"{path}: no rows")
    store = _open(args)
    try:
        users = list_users(store)
        owner = next((u for u in users if u["username"] == args.user), None) if args.user else \
            next((u for u in users if u["role"] == "admin"), None)
        if owner is None:
            raise ChatforgeError(f"no user {args.user!r}" if args.user else
                                 "no admin user to own the dataset: create one with "
                                 "`chatforge feedback users add admin --role admin` (or pass --user NAME)")
        try:
            result = import_dataset(store, args.name, args.kind, rows, created_by=owner["id"])
        except Invalid as e:
            m = re.match(r"rows\[(\d+)\](.*)", e.field)
            if m:  # point at the file line, not the list index
                raise ChatforgeError(f"{path}:{lines[int(m.group(1))]}: {m.group(2).lstrip('.') or 'row'}: "
                                     f"{e.message}") from e
            raise
    finally:
        store.close()
    print(f"imported {result['count']} {args.kind} into dataset {args.name!r} (id {result['id']})")


def cmd_db_upgrade(args: argparse.Namespace) -> None:
    from chatforge.store.db import Store

    store = Store(db_url_from_args(args), upgrade=False)
    try:
        before = store.current_revision()
        after = store.upgrade()
    finally:
        store.close()
    print(f"{store.safe_url}: at revision {after}" + (" (already up to date)" if before == after
                                                      else f" (was {before or 'empty'})"))


def add_feedback_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``feedback`` and its subcommands to the main parser's subparsers."""
    fb = sub.add_parser("feedback", help="human feedback store: users, datasets, export to training data")
    fb_sub = fb.add_subparsers(dest="action", required=True)

    ex = fb_sub.add_parser("export", help="write preferences/sft/labels/ratings/moderation JSONL from the collected "
                                          "feedback")
    _db_args(ex)
    ex.add_argument("--out", required=True, help="output directory")
    ex.add_argument("--kind", action="append", choices=ALL_EXPORT_KINDS,
                    help="what to export (repeatable; default: all); moderation = reviewed safety flags as "
                         "{\"text\", \"label\", \"place\", \"source\"} for the moderation classifier")
    ex.add_argument("--min-rating", type=float, default=4.0,
                    help="sft keeps rated answers whose mean rating is at least this (default 4.0)")
    ex.set_defaults(func=cmd_export)

    users = fb_sub.add_parser("users", help="manage users")
    users_sub = users.add_subparsers(dest="users_action", required=True)
    add = users_sub.add_parser("add", help="create a user")
    add.add_argument("username")
    add.add_argument("--role", required=True, choices=ROLES)
    add.add_argument("--password", help=f"the password (default: ${PASSWORD_ENV}, else asked; "
                                        "note a password on the command line lands in shell history)")
    _db_args(add)
    add.set_defaults(func=cmd_users_add)
    key = users_sub.add_parser("key", help="create an API key for a user (printed once)")
    key.add_argument("username")
    _db_args(key)
    key.set_defaults(func=cmd_users_key)
    role = users_sub.add_parser("set-role", help="change a user's role (the last admin stays admin)")
    role.add_argument("username")
    role.add_argument("role", choices=ROLES)
    _db_args(role)
    role.set_defaults(func=cmd_users_set_role)
    ls = users_sub.add_parser("list", help="list users")
    _db_args(ls)
    ls.set_defaults(func=cmd_users_list)

    imp = fb_sub.add_parser("import", help="import a JSONL dataset of prompts (to answer and rate/rank) or items "
                                           "(to label)")
    imp.add_argument("name", help="dataset name (unique)")
    imp.add_argument("file", help="JSONL: prompts {\"prompt\": text | messages} or {\"messages\": [...]}; "
                                  "items {\"text\", \"meta\"?}")
    imp.add_argument("--kind", required=True, choices=["prompts", "items"])
    imp.add_argument("--user", help="owner of the dataset (default: the first admin)")
    _db_args(imp)
    imp.set_defaults(func=cmd_import)

    from chatforge.store.stats_cli import add_stats_parser

    add_stats_parser(fb_sub, _db_args)

    db = fb_sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_action", required=True)
    up = db_sub.add_parser("upgrade", help="migrate the schema to the newest revision (also done on every open)")
    _db_args(up)
    up.set_defaults(func=cmd_db_upgrade)
    return fb
