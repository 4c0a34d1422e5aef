"""What changes when the tests run in CI (``CI=true``, as ``.ci/run`` sets): a test whose
prerequisite is missing (a browser, a PostgreSQL server) fails with the reason instead of
skipping, so CI cannot pass without having run it. Locally it skips and says why."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def skip_or_fail(reason: str) -> None:
    """Skip with ``reason`` locally; fail with it under ``CI=true``."""
    if in_ci():
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)
