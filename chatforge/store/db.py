"""Opening the feedback database: engine, SQLite tuning, sessions and migrations.

One ``Store`` per process wraps a SQLAlchemy engine. SQLite (the default: a
``feedback.db`` file in the run directory) is set up for a small team writing at once:

- WAL journal, so readers never block the writer and the writer never blocks readers;
- ``busy_timeout`` of 30 s, so a writer waits for the lock instead of failing with
  "database is locked";
- ``BEGIN IMMEDIATE`` for write transactions: the write lock is taken at the start,
  not upgraded from a read lock halfway through (an upgrade that loses a race fails at
  once, without waiting). Read-only sessions (``session(write=False)``) use a plain
  deferred ``BEGIN`` and run concurrently;
- foreign keys enforced, ``synchronous=NORMAL`` (safe with WAL, much faster).

Any other SQLAlchemy URL is passed through unchanged, e.g.
``postgresql+psycopg://user:pass@host/db`` for a team server (install the driver
yourself: ``pip install 'psycopg[binary]'``; chatforge does not depend on it). Writers
into one conversation take turns through a row lock there (``service.add_message``).

Secrets stay out of output: anything that shows a database URL shows ``safe_url(url)``
(the password as ``***``), and the engines hide SQL parameters from their error
messages, so a failed insert cannot print a password hash, a token hash or a user's text.

Opening a Store upgrades the schema to the newest Alembic revision, inside one
transaction, so two processes opening a fresh file at once cannot both create it.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.orm import Session
from sqlalchemy.pool import StaticPool

from chatforge.errors import ChatforgeError

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
BUSY_TIMEOUT_MS = 30_000


def safe_url(url: str) -> str:
    """``url`` with its password shown as ``***``: the only form of a database URL to print or log.
    A string SQLAlchemy cannot parse keeps nothing between ``://user:`` and ``@`` either."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return re.sub(r"(://[^/:@]*:)[^/@]*@", r"\1***@", str(url))


def default_db_url(run_dir: Path) -> str:
    """The SQLite feedback database of a run: ``sqlite:///<run_dir>/feedback.db``."""
    return f"sqlite:///{Path(run_dir) / 'feedback.db'}"


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Take transaction control away from the sqlite3 module (it would BEGIN lazily, only
    # before DML, leaving DDL and reads outside transactions); `_sqlite_on_begin` emits BEGIN.
    dbapi_conn.isolation_level = None
    cur = dbapi_conn.cursor()
    cur.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys = ON")
    cur.execute("PRAGMA synchronous = NORMAL")
    cur.execute("PRAGMA journal_mode = WAL")  # a no-op (stays 'memory') for in-memory databases
    cur.close()


def _sqlite_on_begin(conn: Any) -> None:
    mode = conn.get_execution_options().get("chatforge_sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")


class Store:
    """The feedback database at ``url`` (any SQLAlchemy URL), migrated to the newest schema.

    ``with store.session() as s:`` is one transaction: committed when the block ends,
    rolled back if it raises. Pass ``write=False`` for read-only work (on SQLite it then
    runs concurrently with writers instead of queueing for the write lock).
    """

    def __init__(self, url: str, upgrade: bool = True) -> None:
        self.url = url
        self.safe_url = safe_url(url)
        try:
            parsed = make_url(url)
        except ArgumentError:  # `from None`: SQLAlchemy's message repeats the raw URL, password included
            raise ChatforgeError(f"database URL {self.safe_url!r} is not a valid SQLAlchemy URL "
                                 "(e.g. sqlite:///runs/default/feedback.db)") from None
        self._password = str(parsed.password) if parsed.password else None
        self.is_sqlite = parsed.get_backend_name() == "sqlite"
        # an in-memory SQLite database is one connection shared by every session: one at a time
        self._serialize: Any = None
        try:
            if self.is_sqlite:
                self.engine = self._sqlite_engine(parsed)
            else:
                self.engine = create_engine(url, pool_pre_ping=True, hide_parameters=True)
        except (NoSuchModuleError, ModuleNotFoundError, ImportError) as e:
            raise ChatforgeError(f"database {self.safe_url}: no driver for it ({self._scrub(e)}); install it, e.g. "
                                 "`pip install 'psycopg[binary]'` for postgresql+psycopg://") from e
        # write transactions take SQLite's write lock up front (see the module docstring)
        self._write_engine = (self.engine.execution_options(chatforge_sqlite_begin="IMMEDIATE")
                              if self.is_sqlite else self.engine)
        if upgrade:
            self.upgrade()

    def _scrub(self, error: BaseException) -> str:
        """An error's message for the user, with this URL's password (should a driver echo it) as ***."""
        message = str(error)
        return message.replace(self._password, "***") if self._password else message

    def _sqlite_engine(self, parsed: Any) -> Engine:
        database = parsed.database or ""
        in_memory = database in ("", ":memory:") or parsed.query.get("mode") == "memory"
        kwargs: dict[str, Any] = {"connect_args": {"check_same_thread": False}, "hide_parameters": True}
        if in_memory:
            # every new connection to :memory: would be a new, empty database: share one
            kwargs["poolclass"] = StaticPool
            self._serialize = threading.RLock()
        else:
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, **kwargs)
        event.listen(engine, "connect", _sqlite_on_connect)
        event.listen(engine, "begin", _sqlite_on_begin)
        return engine

    @contextlib.contextmanager
    def session(self, write: bool = True) -> Iterator[Session]:
        """One transaction: commit on success, roll back on error."""
        with self._serialize or contextlib.nullcontext(), \
                Session(self._write_engine if write else self.engine, expire_on_commit=False) as s:
            try:
                yield s
                s.commit()
            except BaseException:
                s.rollback()
                raise

    # ----------------------------------------------------------------------- migrations

    def alembic_config(self) -> Any:
        """An Alembic ``Config`` for this database (no alembic.ini involved)."""
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))  # configparser interpolation
        return cfg

    def upgrade(self, revision: str = "head") -> str | None:
        """Migrate the schema to ``revision`` (default: the newest) in one transaction; a
        database already there is left untouched. Returns the revision now current."""
        from alembic import command

        cfg = self.alembic_config()
        try:
            with self._serialize or contextlib.nullcontext(), self._write_engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, revision)
        except ChatforgeError:
            raise
        except Exception as e:
            raise ChatforgeError(f"database {self.safe_url}: cannot upgrade the schema: {self._scrub(e)}") from e
        return self.current_revision()

    def current_revision(self) -> str | None:
        """The Alembic revision the database is at (None: not created yet)."""
        from alembic.runtime.migration import MigrationContext

        with self._serialize or contextlib.nullcontext(), self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()

    def head_revision(self) -> str:
        from alembic.script import ScriptDirectory

        head = ScriptDirectory.from_config(self.alembic_config()).get_current_head()
        assert head is not None, "the migrations folder has no revision"
        return head

    def close(self) -> None:
        """Close every pooled connection (the Store must not be used afterwards)."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Store({self.safe_url!r})"
