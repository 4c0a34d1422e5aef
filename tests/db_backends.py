"""The database backends the store and web tests run on: SQLite always, PostgreSQL when given one.

Set ``CHATFORGE_TEST_DB_URL`` to a PostgreSQL server's URL (any database on it the tests may
connect to, e.g. ``postgresql+psycopg://user:pass@127.0.0.1:5432/postgres``; the role needs
CREATEDB) and every test that takes the ``db_url`` fixture also runs there, each on a database
of its own (created for the test, dropped after). ``.ci/run`` starts such a server. Without the
variable the PostgreSQL variants skip and say why; under ``CI=true`` they fail instead, so CI
cannot pass without having run them.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ci import skip_or_fail

TEST_DB_ENV = "CHATFORGE_TEST_DB_URL"
BACKENDS = ("sqlite", "postgresql")
MISSING = (f"no PostgreSQL server given: set {TEST_DB_ENV}=postgresql+psycopg://USER:PASS@HOST:PORT/DB "
           "to run the PostgreSQL variants (.ci/run starts one)")


def server_url() -> str | None:
    return os.environ.get(TEST_DB_ENV) or None


@contextmanager
def fresh_database(backend: str, tmp: Path) -> Iterator[str]:
    """The URL of an empty database on ``backend``: a SQLite file under ``tmp``, or a new
    PostgreSQL database on the ``CHATFORGE_TEST_DB_URL`` server (dropped afterwards, even when a
    test left connections open)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp / 'feedback.db'}"
        return
    url = server_url()
    if url is None:
        skip_or_fail(MISSING)
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    server = make_url(url)
    name = f"chatforge_test_{secrets.token_hex(6)}"
    admin = create_engine(server, isolation_level="AUTOCOMMIT")  # CREATE DATABASE cannot run in a transaction
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()
