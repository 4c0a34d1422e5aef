"""Fixtures shared by the test files (the plain helpers live in helpers.py, serve_fixtures.py and db_backends.py)."""

from __future__ import annotations

import pytest
from db_backends import BACKENDS, fresh_database


@pytest.fixture(params=BACKENDS)
def db_url(request, tmp_path):
    """An empty feedback database for one test, on each backend: SQLite, and PostgreSQL when
    ``CHATFORGE_TEST_DB_URL`` names a server (else that variant skips, or fails under CI=true)."""
    with fresh_database(request.param, tmp_path) as url:
        yield url
