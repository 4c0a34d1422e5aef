"""The feedback database schema (SQLAlchemy 2.x declarative).

Three groups of tables:

- accounts: ``users`` (scrypt password hash, role), ``sessions`` and ``api_keys``
  (only sha256 hashes of the secrets are stored, so a leaked database leaks no login);
- chat: ``conversations`` and their ``messages`` (a tree: a regenerated answer is a
  sibling of the first, sharing its ``parent_id``) with per-user ``message_feedback``;
- review work: ``datasets`` of ``prompts`` (to answer, then rate/rank) or ``items``
  (to label), model ``responses``, ``label_schemas``, ``assignments`` (one unit of
  work for one user) and their results ``ratings``, ``rankings`` and ``labels``;
- safety: ``safety_flags``, the exchanges the serving guard (``chatforge.serve.guard``)
  found something in, with what was generated and delivered, and a reviewer's decision.

Integrity lives in the database, not only in Python: unique constraints make a
double submit or a duplicate assignment fail instead of adding a row, CHECK
constraints bound roles, kinds and scores. Every timestamp is UTC (stored naive
on SQLite, read back timezone-aware).

The schema is created by the Alembic migrations in ``migrations/versions/`` (``0001_initial``,
``0002_safety_flags``); a test checks that the migrations and these models agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from chatforge.store.constants import ASSIGNMENT_KINDS, DATASET_KINDS, RATING_ASPECTS, ROLES

# Deterministic constraint names: migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

ASSIGNMENT_STATUSES = ("pending", "done")
FLAG_PLACES = ("prompt", "answer")
FLAG_STATUSES = ("pending", "confirmed", "cleared")


def utcnow() -> datetime:
    return datetime.now(UTC)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator):
    """A timezone-aware UTC datetime on every backend (SQLite has no timezone type:
    values are stored as naive UTC and get their tzinfo back when read)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column; use datetime.now(UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


# --------------------------------------------------------------------------- accounts


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(_in("role", ROLES), name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LoginSession(Base):
    __tablename__ = "sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the cookie value
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 hex of the key
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    last_used: Mapped[datetime | None] = mapped_column(UTCDateTime)


# --------------------------------------------------------------------------- chat


class Conversation(Base):
    __tablename__ = "conversations"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(String(200))
    title: Mapped[str | None] = mapped_column(String(200))
    system: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Message(Base):
    __tablename__ = "messages"
    __table_args__ = (
        UniqueConstraint("conversation_id", "position"),
        CheckConstraint(_in("role", ("system", "user", "assistant")), name="role"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    conversation_id: Mapped[int] = mapped_column(ForeignKey("conversations.id", ondelete="CASCADE"))
    role: Mapped[str] = mapped_column(String(16))
    content: Mapped[str] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(64))
    # the message this one answers (or follows): regenerated answers share their parent
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    position: Mapped[int] = mapped_column(Integer)  # insertion order within the conversation
    # why an assistant message ended: "stop", "length", "cancelled" (client left), "error"; None otherwise
    finish_reason: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class MessageFeedback(Base):
    __tablename__ = "message_feedback"
    __table_args__ = (
        UniqueConstraint("user_id", "message_id"),
        CheckConstraint("thumb IN (-1, 0, 1)", name="thumb"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    message_id: Mapped[int] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"), index=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    thumb: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# --------------------------------------------------------------------------- review data


class Dataset(Base):
    __tablename__ = "datasets"
    __table_args__ = (CheckConstraint(_in("kind", DATASET_KINDS), name="kind"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    kind: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Prompt(Base):
    __tablename__ = "prompts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    messages: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # chat messages ending with a user turn


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    text: Mapped[str] = mapped_column(Text)
    meta: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Response(Base):
    __tablename__ = "responses"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    model_id: Mapped[str] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(64))
    text: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class LabelSchema(Base):
    __tablename__ = "label_schemas"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    fields: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# --------------------------------------------------------------------------- review work


class Assignment(Base):
    """One unit of work for one user: rate a response, rank a prompt's responses, or
    label an item. ``unit_id`` repeats the id of that unit so that (user, kind, unit)
    can be unique in SQL (the typed reference columns are NULL for the other kinds, and
    NULLs never collide in a unique constraint)."""

    __tablename__ = "assignments"
    __table_args__ = (
        UniqueConstraint("user_id", "kind", "unit_id"),
        CheckConstraint(_in("kind", ASSIGNMENT_KINDS), name="kind"),
        CheckConstraint(_in("status", ASSIGNMENT_STATUSES), name="status"),
        CheckConstraint(
            "(kind = 'rate' AND response_id = unit_id AND prompt_id IS NULL AND item_id IS NULL)"
            " OR (kind = 'rank' AND prompt_id = unit_id AND response_id IS NULL AND item_id IS NULL)"
            " OR (kind = 'label' AND item_id = unit_id AND schema_id IS NOT NULL"
            " AND response_id IS NULL AND prompt_id IS NULL)",
            name="unit",
        ),
        Index("ix_assignments_user_kind_status", "user_id", "kind", "status"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(16))
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"), index=True)
    unit_id: Mapped[int] = mapped_column(Integer)
    response_id: Mapped[int | None] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"))
    prompt_id: Mapped[int | None] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"))
    item_id: Mapped[int | None] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    schema_id: Mapped[int | None] = mapped_column(ForeignKey("label_schemas.id"))
    status: Mapped[str] = mapped_column(String(16), default="pending")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    done_at: Mapped[datetime | None] = mapped_column(UTCDateTime)


class Rating(Base):
    __tablename__ = "ratings"
    __table_args__ = tuple(
        CheckConstraint(f"{aspect} BETWEEN 1 AND 5", name=aspect) for aspect in RATING_ASPECTS
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id", ondelete="CASCADE"), index=True)
    fluency: Mapped[int] = mapped_column(Integer)
    coherence: Mapped[int] = mapped_column(Integer)
    relevance: Mapped[int] = mapped_column(Integer)
    appropriateness: Mapped[int] = mapped_column(Integer)
    comment: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Ranking(Base):
    __tablename__ = "rankings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    prompt_id: Mapped[int] = mapped_column(ForeignKey("prompts.id", ondelete="CASCADE"), index=True)
    order: Mapped[list[int]] = mapped_column(JSON)  # response ids, best first
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class Label(Base):
    __tablename__ = "labels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    assignment_id: Mapped[int] = mapped_column(ForeignKey("assignments.id", ondelete="CASCADE"), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"))
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"), index=True)
    schema_id: Mapped[int] = mapped_column(ForeignKey("label_schemas.id"))
    value: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


# --------------------------------------------------------------------------- safety


class SafetyFlag(Base):
    """One exchange the serving guard found something in (any finding, any action, prompt or answer).

    ``answer_generated`` is what the model wrote (the unsafe original: for reviewers only, never
    shown to the user); ``answer_delivered`` is what the client got (redacted, cut, or the
    refusal). A reviewer confirms it (``reviewer_category``: the category it really is) or
    clears it (a false alarm); decided flags are the moderation classifier's training data."""

    __tablename__ = "safety_flags"
    __table_args__ = (
        CheckConstraint(_in("place", FLAG_PLACES), name="place"),
        CheckConstraint(_in("status", FLAG_STATUSES), name="status"),
        Index("ix_safety_flags_status_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(String(16))  # "api" or "web"
    place: Mapped[str] = mapped_column(String(16))
    category: Mapped[str] = mapped_column(String(64))  # the category deciding the action
    layer: Mapped[str] = mapped_column(String(16))  # rules | classifier
    action: Mapped[str] = mapped_column(String(16))  # allow | flag | redact | refuse
    findings: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # every finding: rule, span, evidence
    policy: Mapped[str | None] = mapped_column(String(200))  # the policy's name and version
    prompt: Mapped[list[dict[str, Any]]] = mapped_column(JSON)  # the messages as the client sent them
    answer_generated: Mapped[str | None] = mapped_column(Text)
    answer_delivered: Mapped[str | None] = mapped_column(Text)
    model_id: Mapped[str | None] = mapped_column(String(200))
    model_version: Mapped[str | None] = mapped_column(String(64))
    conversation_id: Mapped[int | None] = mapped_column(ForeignKey("conversations.id", ondelete="SET NULL"))
    message_id: Mapped[int | None] = mapped_column(ForeignKey("messages.id", ondelete="SET NULL"))
    ident: Mapped[str | None] = mapped_column(String(200))  # user:NAME, key:HASH or ip:ADDRESS
    status: Mapped[str] = mapped_column(String(16), default="pending")
    reviewer_id: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    reviewed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    reviewer_category: Mapped[str | None] = mapped_column(String(64))
