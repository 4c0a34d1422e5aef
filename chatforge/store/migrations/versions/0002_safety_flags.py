"""safety flags: exchanges the serving guard found something in, and their review

Revision ID: 0002
Revises: 0001
Create Date: 2026-02-01

Frozen copy of ``SafetyFlag`` in chatforge/store/models.py as of this revision.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | tuple[str, ...] | None = None
depends_on: str | tuple[str, ...] | None = None

TABLE = "safety_flags"


def _fk(column: str, target: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint([column], [f"{target}.id"], name=op.f(f"fk_{TABLE}_{column}_{target}"),
                                   ondelete="SET NULL")


def upgrade() -> None:
    op.create_table(
        TABLE,
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("place", sa.String(16), nullable=False),
        sa.Column("category", sa.String(64), nullable=False),
        sa.Column("layer", sa.String(16), nullable=False),
        sa.Column("action", sa.String(16), nullable=False),
        sa.Column("findings", sa.JSON(), nullable=False),
        sa.Column("policy", sa.String(200), nullable=True),
        sa.Column("prompt", sa.JSON(), nullable=False),
        sa.Column("answer_generated", sa.Text(), nullable=True),
        sa.Column("answer_delivered", sa.Text(), nullable=True),
        sa.Column("model_id", sa.String(200), nullable=True),
        sa.Column("model_version", sa.String(64), nullable=True),
        sa.Column("conversation_id", sa.Integer(), nullable=True),
        sa.Column("message_id", sa.Integer(), nullable=True),
        sa.Column("ident", sa.String(200), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("reviewer_id", sa.Integer(), nullable=True),
        sa.Column("reviewed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("reviewer_category", sa.String(64), nullable=True),
        sa.CheckConstraint("place IN ('prompt', 'answer')", name=op.f(f"ck_{TABLE}_place")),
        sa.CheckConstraint("status IN ('pending', 'confirmed', 'cleared')", name=op.f(f"ck_{TABLE}_status")),
        _fk("conversation_id", "conversations"),
        _fk("message_id", "messages"),
        _fk("reviewer_id", "users"),
        sa.PrimaryKeyConstraint("id", name=op.f(f"pk_{TABLE}")),
    )
    op.create_index("ix_safety_flags_status_id", TABLE, ["status", "id"], unique=False)


def downgrade() -> None:
    op.drop_table(TABLE)  # its index goes with it
