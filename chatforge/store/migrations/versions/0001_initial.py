"""initial schema: accounts, chat, review data and review work

Revision ID: 0001
Revises:
Create Date: 2026-01-01

Frozen copy of chatforge/store/models.py as of this revision (migrations never import
the models: later model changes get their own revision). Timestamps are
``DateTime(timezone=True)``; the models read them back as UTC.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None


def _ts(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def _id() -> sa.Column:
    return sa.Column("id", sa.Integer(), nullable=False)


def _fk(table: str, column: str, target: str, ondelete: str | None = "CASCADE") -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"], name=op.f(f"fk_{table}_{column}_{target}"),
                                   ondelete=ondelete)


def _pk(table: str) -> sa.PrimaryKeyConstraint:
    return sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{table}"))


def _uq(table: str, *columns: str) -> sa.UniqueConstraint:
    return sa.UniqueConstraint(*columns, name=op.f(f"uq_{table}_{'_'.join(columns)}"))


def _ck(table: str, name: str, sql: str) -> sa.CheckConstraint:
    return sa.CheckConstraint(sql, name=op.f(f"ck_{table}_{name}"))


def _index(table: str, *columns: str, name: str | None = None) -> None:
    op.create_index(name or op.f(f"ix_{table}_{'_'.join(columns)}"), table, list(columns), unique=False)


def upgrade() -> None:
    # ---------------------------------------------------------------- accounts
    op.create_table(
        "users",
        _id(),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        _ts("created_at"),
        _ck("users", "role", "role IN ('admin', 'reviewer', 'annotator')"),
        _pk("users"),
        _uq("users", "username"),
    )
    op.create_table(
        "sessions",
        _id(),
        sa.Column("token_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _fk("sessions", "user_id", "users"),
        _pk("sessions"),
        _uq("sessions", "token_hash"),
    )
    _index("sessions", "user_id")
    op.create_table(
        "api_keys",
        _id(),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ts("last_used", nullable=True),
        _fk("api_keys", "user_id", "users"),
        _pk("api_keys"),
        _uq("api_keys", "key_hash"),
    )
    _index("api_keys", "user_id")

    # ---------------------------------------------------------------- chat
    op.create_table(
        "conversations",
        _id(),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("title", sa.String(200), nullable=True),
        sa.Column("system", sa.Text(), nullable=True),
        _ts("created_at"),
        _fk("conversations", "user_id", "users"),
        _pk("conversations"),
    )
    _index("conversations", "user_id")
    op.create_table(
        "messages",
        _id(),
        sa.Column("conversation_id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("content", sa.Text(), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=True),
        _ts("created_at"),
        _ck("messages", "role", "role IN ('system', 'user', 'assistant')"),
        _fk("messages", "conversation_id", "conversations"),
        _fk("messages", "parent_id", "messages"),
        _pk("messages"),
        _uq("messages", "conversation_id", "position"),
    )
    _index("messages", "parent_id")
    op.create_table(
        "message_feedback",
        _id(),
        sa.Column("message_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("thumb", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        _ts("updated_at"),
        _ck("message_feedback", "thumb", "thumb IN (-1, 0, 1)"),
        _fk("message_feedback", "message_id", "messages"),
        _fk("message_feedback", "user_id", "users"),
        _pk("message_feedback"),
        _uq("message_feedback", "user_id", "message_id"),
    )
    _index("message_feedback", "message_id")

    # ---------------------------------------------------------------- review data
    op.create_table(
        "datasets",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("created_by", sa.Integer(), nullable=False),
        _ts("created_at"),
        _ck("datasets", "kind", "kind IN ('prompts', 'items')"),
        _fk("datasets", "created_by", "users", ondelete=None),
        _pk("datasets"),
        _uq("datasets", "name"),
    )
    op.create_table(
        "prompts",
        _id(),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("messages", sa.JSON(), nullable=False),
        _fk("prompts", "dataset_id", "datasets"),
        _pk("prompts"),
    )
    _index("prompts", "dataset_id")
    op.create_table(
        "items",
        _id(),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("meta", sa.JSON(), nullable=True),
        _fk("items", "dataset_id", "datasets"),
        _pk("items"),
    )
    _index("items", "dataset_id")
    op.create_table(
        "responses",
        _id(),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("model_id", sa.String(200), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("text", sa.Text(), nullable=False),
        _ts("created_at"),
        _fk("responses", "prompt_id", "prompts"),
        _pk("responses"),
    )
    _index("responses", "prompt_id")
    op.create_table(
        "label_schemas",
        _id(),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("fields", sa.JSON(), nullable=False),
        _ts("created_at"),
        _pk("label_schemas"),
        _uq("label_schemas", "name"),
    )

    # ---------------------------------------------------------------- review work
    op.create_table(
        "assignments",
        _id(),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("dataset_id", sa.Integer(), nullable=False),
        sa.Column("unit_id", sa.Integer(), nullable=False),
        sa.Column("response_id", sa.Integer(), nullable=True),
        sa.Column("prompt_id", sa.Integer(), nullable=True),
        sa.Column("item_id", sa.Integer(), nullable=True),
        sa.Column("schema_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        _ts("created_at"),
        _ts("done_at", nullable=True),
        _ck("assignments", "kind", "kind IN ('rate', 'rank', 'label')"),
        _ck("assignments", "status", "status IN ('pending', 'done')"),
        _ck("assignments", "unit",
            "(kind = 'rate' AND response_id = unit_id AND prompt_id IS NULL AND item_id IS NULL)"
            " OR (kind = 'rank' AND prompt_id = unit_id AND response_id IS NULL AND item_id IS NULL)"
            " OR (kind = 'label' AND item_id = unit_id AND schema_id IS NOT NULL"
            " AND response_id IS NULL AND prompt_id IS NULL)"),
        _fk("assignments", "user_id", "users"),
        _fk("assignments", "dataset_id", "datasets"),
        _fk("assignments", "response_id", "responses"),
        _fk("assignments", "prompt_id", "prompts"),
        _fk("assignments", "item_id", "items"),
        _fk("assignments", "schema_id", "label_schemas", ondelete=None),
        _pk("assignments"),
        _uq("assignments", "user_id", "kind", "unit_id"),
    )
    _index("assignments", "dataset_id")
    _index("assignments", "user_id", "kind", "status", name="ix_assignments_user_kind_status")
    op.create_table(
        "ratings",
        _id(),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("response_id", sa.Integer(), nullable=False),
        sa.Column("fluency", sa.Integer(), nullable=False),
        sa.Column("coherence", sa.Integer(), nullable=False),
        sa.Column("relevance", sa.Integer(), nullable=False),
        sa.Column("appropriateness", sa.Integer(), nullable=False),
        sa.Column("comment", sa.Text(), nullable=True),
        _ts("created_at"),
        *(_ck("ratings", aspect, f"{aspect} BETWEEN 1 AND 5")
          for aspect in ("fluency", "coherence", "relevance", "appropriateness")),
        _fk("ratings", "assignment_id", "assignments"),
        _fk("ratings", "user_id", "users"),
        _fk("ratings", "response_id", "responses"),
        _pk("ratings"),
        _uq("ratings", "assignment_id"),
    )
    _index("ratings", "response_id")
    op.create_table(
        "rankings",
        _id(),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("prompt_id", sa.Integer(), nullable=False),
        sa.Column("order", sa.JSON(), nullable=False),
        _ts("created_at"),
        _fk("rankings", "assignment_id", "assignments"),
        _fk("rankings", "user_id", "users"),
        _fk("rankings", "prompt_id", "prompts"),
        _pk("rankings"),
        _uq("rankings", "assignment_id"),
    )
    _index("rankings", "prompt_id")
    op.create_table(
        "labels",
        _id(),
        sa.Column("assignment_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("item_id", sa.Integer(), nullable=False),
        sa.Column("schema_id", sa.Integer(), nullable=False),
        sa.Column("value", sa.JSON(), nullable=False),
        _ts("created_at"),
        _fk("labels", "assignment_id", "assignments"),
        _fk("labels", "user_id", "users"),
        _fk("labels", "item_id", "items"),
        _fk("labels", "schema_id", "label_schemas", ondelete=None),
        _pk("labels"),
        _uq("labels", "assignment_id"),
    )
    _index("labels", "item_id")


def downgrade() -> None:
    # children before parents; dropping a table drops its indexes
    for table in ("labels", "rankings", "ratings", "assignments", "label_schemas", "responses", "items", "prompts",
                  "datasets", "message_feedback", "messages", "conversations", "api_keys", "sessions", "users"):
        op.drop_table(table)
