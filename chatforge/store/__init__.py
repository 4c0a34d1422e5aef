"""The human-feedback store: users, chats with thumbs, review datasets and their ratings,
rankings and labels, in SQLite (default) or any SQLAlchemy database.

- ``db``: ``Store`` (engine, sessions, Alembic migrations run on open) and ``default_db_url``;
- ``models``: the tables; ``migrations/``: the Alembic revisions that create them;
- ``service``: every operation, as functions returning plain dicts;
- ``export``: JSONL training data (preferences, SFT, labels, ratings) from the feedback;
- ``cli``: ``chatforge feedback ...``.
"""

from typing import Any

__all__ = ["Store", "default_db_url"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `chatforge --help` (which imports store.cli) does not load SQLAlchemy.
    if name in __all__:
        from chatforge.store import db

        return getattr(db, name)
    raise AttributeError(f"module 'chatforge.store' has no attribute {name!r}")
