"""Alembic environment for the chatforge feedback store.

Run programmatically by ``chatforge.store.db`` (no alembic.ini needed): the caller
either hands over an open connection in ``config.attributes["connection"]`` (so the
migration runs inside the caller's transaction, with its SQLite pragmas) or sets
``sqlalchemy.url``. ``alembic revision --autogenerate`` works too when pointed at this
folder, comparing against ``chatforge.store.models``.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from chatforge.store.models import Base

config = context.config
target_metadata = Base.metadata


def _configure(**kwargs) -> None:
    context.configure(
        target_metadata=target_metadata,
        # SQLite cannot ALTER most things: later migrations use batch mode (copy-and-move) there
        render_as_batch=True,
        compare_type=True,
        **kwargs,
    )


def run_migrations_offline() -> None:
    """Emit the SQL to stdout instead of running it (``alembic upgrade head --sql``)."""
    _configure(url=config.get_main_option("sqlalchemy.url"), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection=connection)
        with context.begin_transaction():  # a no-op inside the caller's transaction
            context.run_migrations()
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    try:
        with engine.begin() as conn:
            _configure(connection=conn)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
