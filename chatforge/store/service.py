"""Everything the web app and the CLI do with the feedback store, as plain functions.

Each function takes the ``Store`` first, runs in one transaction and returns plain
dicts (never ORM objects), so callers cannot trigger lazy loads after the session
closed and results serialise straight to JSON (timestamps are ISO 8601 UTC strings).

Errors say what to fix: ``NotFound`` (no such id, or someone else's conversation,
message or assignment: the same answer, so ids do not tell what exists), ``Conflict`` (a duplicate: the username exists, the
assignment was already submitted) and ``Invalid`` (a bad value; ``.field`` names it,
e.g. ``rows[3].prompt`` or ``fluency``). All are ``ChatforgeError``s.

Security notes: passwords are hashed with scrypt and a per-user salt and compared in
constant time; session tokens and API keys are ``secrets.token_urlsafe`` values of
which only the sha256 is stored. Text is stored verbatim and only ever passed to SQL
as bound parameters. Uniqueness (one rating per assignment, one assignment per user
and unit) is enforced by database constraints, so a double submit racing itself
yields one row and one ``Conflict``, never a duplicate.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import random
import re
import secrets
from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from chatforge.chat.template import prompt_messages, validate_messages
from chatforge.errors import ChatforgeError, DataError
from chatforge.eval.agreement import (
    cohen_kappa,
    fleiss_kappa,
    kendall_w,
    krippendorff_alpha,
    pairwise_agreement,
)
from chatforge.store.db import Store
from chatforge.store.models import (
    ASSIGNMENT_KINDS,
    DATASET_KINDS,
    FLAG_PLACES,
    FLAG_STATUSES,
    RATING_ASPECTS,
    ROLES,
    ApiKey,
    Assignment,
    Conversation,
    Dataset,
    Item,
    Label,
    LabelSchema,
    LoginSession,
    Message,
    MessageFeedback,
    Prompt,
    Ranking,
    Rating,
    Response,
    SafetyFlag,
    User,
    utcnow,
)

__all__ = [
    "ROLES", "RATING_ASPECTS", "NotFound", "Forbidden", "Conflict", "Invalid",
    "create_user", "authenticate", "create_session", "user_for_session", "end_session", "end_user_sessions",
    "create_api_key",
    "user_for_api_key", "list_users", "set_role", "create_conversation", "list_conversations",
    "get_conversation", "message_content", "add_message", "set_message_feedback", "import_dataset", "list_datasets",
    "create_label_schema", "list_label_schemas", "prompts_needing_responses", "add_response", "assign",
    "next_assignment", "submit_rating", "submit_ranking", "submit_label", "progress", "agreement",
    "record_flag", "list_flags", "next_flag", "flag_counts", "decide_flag", "flag_text",
]

SESSION_TTL = timedelta(days=7)  # a login lasts at most this long ...
SESSION_IDLE = timedelta(hours=1)  # ... and ends after this long unused (the web app passes its setting)
API_KEY_PREFIX = "cf-"
MAX_TEXT_CHARS = 1_000_000  # message contents, responses, items
MAX_COMMENT_CHARS = 10_000
MAX_NAME_CHARS = 200
USERNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
# scrypt cost: the scrypt paper's interactive-login setting (~50 ms and 16 MiB per hash). OWASP asks for
# N=2**17 on servers: raise N here if logins may be slower; old hashes still verify (each records its own N).
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
LABEL_FIELD_TYPES = ("choice", "text", "bool")
RATE_ROLES = ("reviewer", "admin")
LABEL_ROLES = ("annotator", "admin")
LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't take the write lock on every API request
# Characters no backend stores in a text column: NUL (PostgreSQL's text type refuses it) and unpaired
# UTF-16 surrogates (not encodable as UTF-8, which every driver sends). One rule for every backend, in
# `_text`: text a person sent is refused with `Invalid` naming the field (the web app answers 422);
# text a model generated (assistant messages, responses) has them removed, because an untrained
# model can sample the NUL byte and its answer must still be kept. Text inside JSON columns
# (prompt messages, item meta, label values) is stored escaped, so only its message contents are checked.
UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


class NotFound(ChatforgeError):
    """The id names nothing."""


class Forbidden(ChatforgeError):
    """The role does not allow it (someone else's things are ``NotFound``, not this)."""


class Conflict(ChatforgeError):
    """The change would duplicate something that must be unique, or was already made."""


class Invalid(ChatforgeError):
    """A bad value; ``field`` names it (``rows[3].prompt``, ``fluency``, ``order``)."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = message
        super().__init__(f"{field}: {message}")


# --------------------------------------------------------------------------- small helpers


def _iso(dt: datetime | None) -> str | None:
    return dt.isoformat() if dt is not None else None


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def _text(value: Any, field: str, max_chars: int = MAX_TEXT_CHARS, allow_empty: bool = False,
          generated: bool = False) -> str:
    """The one check every stored text goes through (see ``UNSTORABLE``): a string, not blank
    unless ``allow_empty``, at most ``max_chars``, and free of characters a backend cannot store:
    refused (``Invalid`` naming ``field``), or removed when the text is model output (``generated``)."""
    if not isinstance(value, str):
        raise Invalid(field, f"must be a string, got {_type(value)}")
    if generated:
        value = UNSTORABLE.sub("", value)
    elif (bad := UNSTORABLE.search(value)) is not None:
        what = "a NUL character" if bad.group() == "\x00" else f"an unpaired surrogate (U+{ord(bad.group()):04X})"
        raise Invalid(field, f"contains {what} (character {bad.start() + 1}); the database cannot store it: "
                             "remove it (text may hold any other Unicode character)")
    if not allow_empty and not value.strip():
        raise Invalid(field, "must not be empty")
    if len(value) > max_chars:
        raise Invalid(field, f"is {len(value)} characters long; the limit is {max_chars}")
    return value


def _opt_text(value: Any, field: str, max_chars: int = MAX_TEXT_CHARS) -> str | None:
    return None if value is None else _text(value, field, max_chars, allow_empty=True)


def message_content(role: str, content: Any) -> str:
    """``content`` as ``add_message`` stores it for ``role``, or ``Invalid`` (field ``content``): lets
    the web app refuse a message before it starts generating an answer to it. An assistant message is
    model output: it may be empty, and characters no backend can store are removed from it."""
    if role == "assistant":
        return _text(content, "content", allow_empty=True, generated=True)
    return _text(content, "content")


def _int(value: Any, field: str, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(field, f"must be an integer, got {_type(value)}")
    if minimum is not None and value < minimum:
        raise Invalid(field, f"must be at least {minimum}, got {value}")
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _choice(value: Any, field: str, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise Invalid(field, f"{value!r} is not one of: {', '.join(allowed)}")
    return value


def _get(s: Session, model: type, id_: Any, what: str, field: str | None = None, lock: bool = False) -> Any:
    """The row, or NotFound; ``lock``: held with a row lock (``FOR NO KEY UPDATE``) until the
    transaction ends, for read-modify-writes that must not interleave (ignored by SQLite, whose
    write transactions already run one at a time)."""
    if isinstance(id_, bool) or not isinstance(id_, int):
        raise Invalid(field or f"{what}_id", f"must be an integer id, got {_type(id_)}")
    obj = s.get(model, id_, with_for_update={"key_share": True} if lock else None)
    if obj is None:
        raise NotFound(f"no {what} with id {id_}")
    return obj


def _user_dict(u: User) -> dict[str, Any]:
    return {"id": u.id, "username": u.username, "role": u.role}


def _num(x: float | None) -> float | None:
    """JSON-safe float: NaN (an undefined coefficient) becomes None."""
    return None if x is None or math.isnan(x) else float(x)


# --------------------------------------------------------------------------- passwords


def hash_password(password: str) -> str:
    """``scrypt$N$r$p$salt$hash`` with a fresh 16-byte salt."""
    salt = os.urandom(16)
    dk = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P,
                        maxmem=64 * 1024 * 1024, dklen=32)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${dk.hex()}"


def verify_password(password: str, stored: str) -> bool:
    """Constant-time check of ``password`` against a ``hash_password`` string."""
    try:
        algo, n, r, p, salt, expected = stored.split("$")
        if algo != "scrypt":
            return False
        want = bytes.fromhex(expected)
        got = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=64 * 1024 * 1024, dklen=len(want))
    except ValueError:
        return False
    return hmac.compare_digest(got, want)


_DUMMY_HASH: str | None = None


def _dummy_hash() -> str:
    # checked against when the username is unknown, so a miss takes as long as a wrong password
    global _DUMMY_HASH
    if _DUMMY_HASH is None:
        _DUMMY_HASH = hash_password(secrets.token_urlsafe(16))
    return _DUMMY_HASH


# --------------------------------------------------------------------------- users, sessions, keys


def create_user(store: Store, username: str, password: str, role: str) -> dict[str, Any]:
    """A new user; ``Conflict`` if the username is taken."""
    if not isinstance(username, str) or not USERNAME_RE.match(username):
        raise Invalid("username", "use 1-64 letters, digits or . _ - @ (no spaces)")
    if not isinstance(password, str) or not password:
        raise Invalid("password", "must be a non-empty string")
    if len(password) > 1024:
        raise Invalid("password", "is longer than 1024 characters")
    _choice(role, "role", ROLES)
    password_hash = hash_password(password)  # slow on purpose: outside the write transaction
    try:
        with store.session() as s:
            if s.scalar(select(User.id).where(User.username == username)) is not None:
                raise Conflict(f"username {username!r} is already taken")
            user = User(username=username, password_hash=password_hash, role=role)
            s.add(user)
            s.flush()
            return _user_dict(user)
    except IntegrityError as e:  # a concurrent create of the same name
        raise Conflict(f"username {username!r} is already taken") from e


def authenticate(store: Store, username: str, password: str) -> dict[str, Any] | None:
    """The user if the password is right, else None (same time either way)."""
    if not isinstance(username, str) or not isinstance(password, str):
        return None
    with store.session(write=False) as s:
        user = s.scalar(select(User).where(User.username == username))
        stored = user.password_hash if user is not None else _dummy_hash()
        result = _user_dict(user) if user is not None else None
    ok = verify_password(password, stored)
    return result if ok and result is not None else None


def create_session(store: Store, user_id: int, ttl: timedelta = SESSION_TTL,
                   idle: timedelta | None = None) -> str:
    """A new login session token (the cookie value; only its sha256 is stored). It lasts ``ttl``
    at most and, with ``idle``, ends once unused that long (``user_for_session`` slides it on)."""
    token = secrets.token_urlsafe(32)
    now = utcnow()
    with store.session() as s:
        _get(s, User, user_id, "user")
        s.add(LoginSession(token_hash=_sha256(token), user_id=user_id, created_at=now,
                           expires_at=now + (min(ttl, idle) if idle is not None else ttl)))
    return token


def user_for_session(store: Store, token: str | None, idle: timedelta | None = None,
                     ttl: timedelta = SESSION_TTL) -> dict[str, Any] | None:
    """The user a live session token belongs to, else None (expired ones are removed).

    With ``idle``, ``expires_at`` is the idle deadline: each use moves it to now + ``idle``
    (written at most once per ``LAST_USED_RESOLUTION``), never past ``created_at + ttl``."""
    if not isinstance(token, str) or not token:
        return None
    token_hash = _sha256(token)
    now = utcnow()
    with store.session(write=False) as s:
        row = s.execute(select(LoginSession.id, LoginSession.created_at, LoginSession.expires_at, User)
                        .join(User, User.id == LoginSession.user_id)
                        .where(LoginSession.token_hash == token_hash)).first()
        if row is None:
            return None
        session_id, created_at, expires_at, user = row
        live = expires_at > now
        result = _user_dict(user)
    if not live:
        end_session(store, token)
        return None
    if idle is not None:
        slid = min(created_at + ttl, now + idle)
        if slid - expires_at >= LAST_USED_RESOLUTION:
            with store.session() as s:
                s.execute(update(LoginSession).where(LoginSession.id == session_id).values(expires_at=slid))
    return result


def end_session(store: Store, token: str | None) -> None:
    """Log out: forget the session (unknown tokens are ignored)."""
    if not isinstance(token, str) or not token:
        return
    with store.session() as s:
        s.execute(delete(LoginSession).where(LoginSession.token_hash == _sha256(token)))


def end_user_sessions(store: Store, user_id: int) -> int:
    """Log out everywhere: end every session of ``user_id``; returns how many there were."""
    with store.session() as s:
        return s.execute(delete(LoginSession).where(LoginSession.user_id == user_id)).rowcount or 0


def create_api_key(store: Store, user_id: int) -> str:
    """A new API key for ``user_id``: returned once, only its sha256 is stored."""
    key = API_KEY_PREFIX + secrets.token_urlsafe(32)
    with store.session() as s:
        _get(s, User, user_id, "user")
        s.add(ApiKey(key_hash=_sha256(key), user_id=user_id))
    return key


def user_for_api_key(store: Store, key: str | None) -> dict[str, Any] | None:
    """The user an API key belongs to (and note when it was used), else None."""
    if not isinstance(key, str) or not key:
        return None
    key_hash = _sha256(key)
    with store.session(write=False) as s:
        row = s.execute(select(ApiKey.id, ApiKey.last_used, User).join(User, User.id == ApiKey.user_id)
                        .where(ApiKey.key_hash == key_hash)).first()
        if row is None:
            return None
        key_id, last_used, user = row
        result = _user_dict(user)
    now = utcnow()
    if last_used is None or now - last_used > LAST_USED_RESOLUTION:
        with store.session() as s:
            key_row = s.get(ApiKey, key_id)
            if key_row is not None:
                key_row.last_used = now
    return result


def list_users(store: Store) -> list[dict[str, Any]]:
    with store.session(write=False) as s:
        return [{**_user_dict(u), "created_at": _iso(u.created_at)}
                for u in s.scalars(select(User).order_by(User.id))]


def set_role(store: Store, username: str, role: str) -> dict[str, Any]:
    """Change a user's role; the last admin cannot be demoted (``Conflict``)."""
    _choice(role, "role", ROLES)
    with store.session() as s:
        user = s.scalar(select(User).where(User.username == username))
        if user is None:
            raise NotFound(f"no user named {username!r}")
        if user.role == "admin" and role != "admin":
            admins = s.scalar(select(func.count()).select_from(User).where(User.role == "admin"))
            if admins <= 1:
                raise Conflict(f"{username!r} is the last admin; make someone else admin first")
        user.role = role
        return _user_dict(user)


# --------------------------------------------------------------------------- conversations


def create_conversation(store: Store, user_id: int, model_id: str, system: str | None = None) -> int:
    model_id = _text(model_id, "model_id", MAX_NAME_CHARS)
    system = _opt_text(system, "system")
    with store.session() as s:
        _get(s, User, user_id, "user")
        conv = Conversation(user_id=user_id, model_id=model_id, system=system or None)
        s.add(conv)
        s.flush()
        return conv.id


def list_conversations(store: Store, user_id: int) -> list[dict[str, Any]]:
    """The user's conversations, newest first."""
    with store.session(write=False) as s:
        rows = s.scalars(select(Conversation).where(Conversation.user_id == user_id)
                         .order_by(Conversation.created_at.desc(), Conversation.id.desc()))
        return [{"id": c.id, "title": c.title, "model_id": c.model_id, "created_at": _iso(c.created_at)}
                for c in rows]


def _own_conversation(s: Session, user_id: int, conv_id: int, missing: str | None = None) -> Conversation:
    conv = _get(s, Conversation, conv_id, "conversation")
    if conv.user_id != user_id:  # the same answer as for a missing id: ids do not tell what exists
        raise NotFound(missing or f"no conversation with id {conv_id}")
    return conv


def get_conversation(store: Store, user_id: int, conv_id: int) -> dict[str, Any]:
    """A conversation with every message (regenerated siblings included, in the order
    written; ``parent_id`` links each to the message it answers) and the user's thumb."""
    with store.session(write=False) as s:
        conv = _own_conversation(s, user_id, conv_id)
        rows = s.execute(
            select(Message, MessageFeedback.thumb, MessageFeedback.comment)
            .outerjoin(MessageFeedback, (MessageFeedback.message_id == Message.id)
                       & (MessageFeedback.user_id == user_id))
            .where(Message.conversation_id == conv.id).order_by(Message.position))
        messages = [{"id": m.id, "role": m.role, "content": m.content, "model_id": m.model_id,
                     "model_version": m.model_version, "parent_id": m.parent_id,
                     "finish_reason": m.finish_reason, "thumb": thumb,
                     "comment": comment, "created_at": _iso(m.created_at)} for m, thumb, comment in rows]
        return {"id": conv.id, "title": conv.title, "model_id": conv.model_id, "system": conv.system,
                "created_at": _iso(conv.created_at), "messages": messages}


def add_message(store: Store, conv_id: int, role: str, content: str, model_id: str | None = None,
                model_version: str | None = None, parent_id: int | None = None,
                finish_reason: str | None = None) -> int:
    """Append a message. Without ``parent_id`` an assistant message answers the latest
    user message (so a regenerated answer becomes a sibling of the first) and any other
    message follows the latest message. The first user message titles the conversation."""
    _choice(role, "role", ("system", "user", "assistant"))
    content = message_content(role, content)
    model_id = _opt_text(model_id, "model_id", MAX_NAME_CHARS)
    model_version = _opt_text(model_version, "model_version", 64)
    finish_reason = _opt_text(finish_reason, "finish_reason", 16)
    with store.session() as s:
        # The conversation row is locked until commit, so writers into one conversation take turns:
        # max(position) + 1 below and the title update see every message committed before. SQLite's
        # BEGIN IMMEDIATE already serialises writers; on PostgreSQL (READ COMMITTED) two writers would
        # otherwise read the same max and one would hit the unique (conversation_id, position).
        # FOR NO KEY UPDATE: it does not block inserts elsewhere that merely reference the row.
        conv = _get(s, Conversation, conv_id, "conversation", lock=True)
        if parent_id is not None:
            parent = _get(s, Message, parent_id, "message", field="parent_id")
            if parent.conversation_id != conv.id:
                raise Invalid("parent_id", f"message {parent_id} is in another conversation")
        else:
            q = select(Message.id).where(Message.conversation_id == conv.id)
            if role == "assistant":
                q = q.where(Message.role == "user")
            parent_id = s.scalar(q.order_by(Message.position.desc()).limit(1))
        position = s.scalar(select(func.coalesce(func.max(Message.position), -1))
                            .where(Message.conversation_id == conv.id)) + 1
        msg = Message(conversation_id=conv.id, role=role, content=content, model_id=model_id,
                      model_version=model_version, parent_id=parent_id, position=position,
                      finish_reason=finish_reason)
        s.add(msg)
        if role == "user" and conv.title is None:
            conv.title = " ".join(content.split())[:80] or None
        s.flush()
        return msg.id


def set_message_feedback(store: Store, user_id: int, message_id: int, thumb: int, comment: str | None) -> None:
    """Thumb up (1), down (-1) or clear (0) an assistant message of the user's own
    conversation, with an optional comment; setting it again replaces it."""
    if isinstance(thumb, bool) or thumb not in (-1, 0, 1):
        raise Invalid("thumb", f"must be -1, 0 or 1, got {thumb!r}")
    comment = _opt_text(comment, "comment", MAX_COMMENT_CHARS) or None
    for attempt in range(2):
        try:
            with store.session() as s:
                msg = _get(s, Message, message_id, "message")
                _own_conversation(s, user_id, msg.conversation_id, missing=f"no message with id {message_id}")
                if msg.role != "assistant":
                    raise Invalid("message_id", f"message {message_id} is a {msg.role} message; "
                                                "only answers get feedback")
                fb = s.scalar(select(MessageFeedback).where(MessageFeedback.user_id == user_id,
                                                            MessageFeedback.message_id == message_id))
                if fb is None:
                    s.add(MessageFeedback(user_id=user_id, message_id=message_id, thumb=thumb, comment=comment))
                else:
                    fb.thumb, fb.comment, fb.updated_at = thumb, comment, utcnow()
            return
        except IntegrityError:  # a concurrent first feedback won the insert (PostgreSQL): update it instead
            if attempt:
                raise


# --------------------------------------------------------------------------- datasets, schemas, responses


def _prompt_row(row: dict[str, Any], where: str) -> list[dict[str, str]]:
    if "messages" in row:
        messages, field = row["messages"], f"{where}.messages"
    elif "prompt" in row:
        messages, field = row["prompt"], f"{where}.prompt"
        if isinstance(messages, str):
            _text(messages, field)
            messages = [{"role": "user", "content": messages}]
    else:
        keys = ", ".join(map(str, row)) or "none"
        raise Invalid(where, f"needs a 'prompt' (text or messages) or 'messages' field; it has: {keys}")
    try:
        validate_messages(messages, where=field)
    except DataError as e:
        raise Invalid(field, str(e).removeprefix(f"{field}: ")) from e
    for i, m in enumerate(messages):
        _text(m["content"], f"{field}[{i}].content", allow_empty=True)
    # a conversation ending with its reference answer is prompted with what precedes it
    messages = [{"role": m["role"], "content": m["content"]} for m in prompt_messages(messages)]
    if not messages or messages[-1]["role"] != "user":
        raise Invalid(field, "must end with a user message (the one the models will answer)")
    return messages


def _item_row(row: dict[str, Any], where: str) -> dict[str, Any]:
    if "text" not in row:
        keys = ", ".join(map(str, row)) or "none"
        raise Invalid(f"{where}.text", f"missing (the row has: {keys})")
    text = _text(row["text"], f"{where}.text")
    meta = row.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise Invalid(f"{where}.meta", f"must be an object, got {_type(meta)}")
    return {"text": text, "meta": meta}


def import_dataset(store: Store, name: str, kind: str, rows: list[dict[str, Any]], created_by: int
                   ) -> dict[str, Any]:
    """A new dataset of prompts (rows ``{"prompt": text | messages}`` or ``{"messages": [...]}``)
    or items (rows ``{"text", "meta"?}``). All rows are checked before anything is stored."""
    name = _text(name, "name", MAX_NAME_CHARS).strip()
    _choice(kind, "kind", DATASET_KINDS)
    if not isinstance(rows, list) or not rows:
        raise Invalid("rows", "must be a non-empty list of objects")
    parsed = []
    for i, row in enumerate(rows):
        where = f"rows[{i}]"
        if not isinstance(row, dict):
            raise Invalid(where, f"must be an object, got {_type(row)}")
        parsed.append(_prompt_row(row, where) if kind == "prompts" else _item_row(row, where))
    try:
        with store.session() as s:
            _get(s, User, created_by, "user", field="created_by")
            if s.scalar(select(Dataset.id).where(Dataset.name == name)) is not None:
                raise Conflict(f"a dataset named {name!r} already exists")
            ds = Dataset(name=name, kind=kind, created_by=created_by)
            s.add(ds)
            s.flush()
            if kind == "prompts":
                s.execute(insert(Prompt), [{"dataset_id": ds.id, "messages": m} for m in parsed])
            else:
                s.execute(insert(Item), [{"dataset_id": ds.id, **item} for item in parsed])
            return {"id": ds.id, "count": len(parsed)}
    except IntegrityError as e:
        raise Conflict(f"a dataset named {name!r} already exists") from e


def list_datasets(store: Store) -> list[dict[str, Any]]:
    with store.session(write=False) as s:
        n_prompts = dict(s.execute(select(Prompt.dataset_id, func.count()).group_by(Prompt.dataset_id)).all())
        n_items = dict(s.execute(select(Item.dataset_id, func.count()).group_by(Item.dataset_id)).all())
        n_responses = dict(s.execute(select(Prompt.dataset_id, func.count(Response.id))
                                     .join(Response, Response.prompt_id == Prompt.id)
                                     .group_by(Prompt.dataset_id)).all())
        return [{"id": d.id, "name": d.name, "kind": d.kind,
                 "count": (n_prompts if d.kind == "prompts" else n_items).get(d.id, 0),
                 "responses": n_responses.get(d.id, 0), "created_at": _iso(d.created_at)}
                for d in s.scalars(select(Dataset).order_by(Dataset.id))]


def _check_schema_fields(fields: Any) -> list[dict[str, Any]]:
    if not isinstance(fields, list) or not fields:
        raise Invalid("fields", "must be a non-empty list of {name, type, options?, required?}")
    out, seen = [], set()
    for i, f in enumerate(fields):
        at = f"fields[{i}]"
        if not isinstance(f, dict):
            raise Invalid(at, f"must be an object, got {_type(f)}")
        name = _text(f.get("name"), f"{at}.name", 64).strip()
        if name in seen:
            raise Invalid(f"{at}.name", f"{name!r} appears twice")
        seen.add(name)
        ftype = _choice(f.get("type"), f"{at}.type", LABEL_FIELD_TYPES)
        required = f.get("required", False)
        if not isinstance(required, bool):
            raise Invalid(f"{at}.required", f"must be true or false, got {required!r}")
        field: dict[str, Any] = {"name": name, "type": ftype, "required": required}
        if ftype == "choice":
            options = f.get("options")
            if (not isinstance(options, list) or len(options) < 2
                    or not all(isinstance(o, str) and o.strip() for o in options)):
                raise Invalid(f"{at}.options", "a choice field needs a list of at least 2 non-empty strings")
            if len(set(options)) != len(options):
                raise Invalid(f"{at}.options", "options must be distinct")
            field["options"] = list(options)
        elif "options" in f:
            raise Invalid(f"{at}.options", f"only choice fields have options (this one is {ftype})")
        if f.get("description") is not None:
            field["description"] = _text(f["description"], f"{at}.description", 2000, allow_empty=True)
        out.append(field)
    return out


def create_label_schema(store: Store, name: str, fields: list[dict[str, Any]]) -> int:
    """A labelling form: fields ``{"name", "type": choice|text|bool, "options" (choice),
    "required": bool, "description"?}``."""
    name = _text(name, "name", MAX_NAME_CHARS).strip()
    checked = _check_schema_fields(fields)
    try:
        with store.session() as s:
            if s.scalar(select(LabelSchema.id).where(LabelSchema.name == name)) is not None:
                raise Conflict(f"a label schema named {name!r} already exists")
            schema = LabelSchema(name=name, fields=checked)
            s.add(schema)
            s.flush()
            return schema.id
    except IntegrityError as e:
        raise Conflict(f"a label schema named {name!r} already exists") from e


def list_label_schemas(store: Store) -> list[dict[str, Any]]:
    with store.session(write=False) as s:
        return [{"id": x.id, "name": x.name, "fields": x.fields, "created_at": _iso(x.created_at)}
                for x in s.scalars(select(LabelSchema).order_by(LabelSchema.id))]


def _dataset(s: Session, dataset_id: int, kind: str | None = None) -> Dataset:
    ds = _get(s, Dataset, dataset_id, "dataset")
    if kind is not None and ds.kind != kind:
        raise Invalid("dataset_id", f"dataset {ds.name!r} holds {ds.kind}, not {kind}")
    return ds


def prompts_needing_responses(store: Store, dataset_id: int, model_id: str, per_model: int
                              ) -> list[dict[str, Any]]:
    """The work left to give every prompt ``per_model`` responses from ``model_id``: one
    entry per missing response (a prompt short of two appears twice), in prompt order."""
    model_id = _text(model_id, "model_id", MAX_NAME_CHARS)
    per_model = _int(per_model, "per_model", minimum=1)
    with store.session(write=False) as s:
        ds = _dataset(s, dataset_id, "prompts")
        have = (select(Response.prompt_id, func.count().label("n")).where(Response.model_id == model_id)
                .group_by(Response.prompt_id).subquery())
        rows = s.execute(select(Prompt.id, Prompt.messages, func.coalesce(have.c.n, 0))
                         .outerjoin(have, have.c.prompt_id == Prompt.id)
                         .where(Prompt.dataset_id == ds.id).order_by(Prompt.id))
        out = []
        for pid, messages, n in rows:
            out.extend({"id": pid, "messages": messages} for _ in range(max(0, per_model - n)))
        return out


def add_response(store: Store, prompt_id: int, model_id: str, model_version: str | None, text: str) -> int:
    model_id = _text(model_id, "model_id", MAX_NAME_CHARS)
    model_version = _opt_text(model_version, "model_version", 64)
    text = _text(text, "text", allow_empty=True, generated=True)  # model output
    with store.session() as s:
        _get(s, Prompt, prompt_id, "prompt")
        r = Response(prompt_id=prompt_id, model_id=model_id, model_version=model_version, text=text)
        s.add(r)
        s.flush()
        return r.id


# --------------------------------------------------------------------------- assignments


def _units(s: Session, ds: Dataset, kind: str) -> list[int]:
    """The unit ids of ``kind`` in a dataset, in id order."""
    if kind == "label":
        _dataset(s, ds.id, "items")
        return list(s.scalars(select(Item.id).where(Item.dataset_id == ds.id).order_by(Item.id)))
    _dataset(s, ds.id, "prompts")
    if kind == "rate":
        return list(s.scalars(select(Response.id).join(Prompt, Prompt.id == Response.prompt_id)
                              .where(Prompt.dataset_id == ds.id).order_by(Response.id)))
    counts = s.execute(select(Prompt.id, func.count(Response.id)).outerjoin(Response, Response.prompt_id == Prompt.id)
                       .where(Prompt.dataset_id == ds.id).group_by(Prompt.id).order_by(Prompt.id)).all()
    # A prompt with fewer than 2 responses has nothing to rank yet: it is left out (assigning again
    # after generating more picks it up); only when no prompt can be ranked is that an error.
    rankable = [pid for pid, n in counts if n >= 2]
    if counts and not rankable:
        pid, n = counts[0]
        more = f" (and {len(counts) - 1} more prompts)" if len(counts) > 1 else ""
        raise Invalid("dataset_id", f"prompt {pid} has {n} response{'s' if n != 1 else ''}{more}; ranking needs "
                                    f"at least 2 per prompt: generate more responses first")
    return rankable


def assign(store: Store, dataset_id: int, kind: str, usernames: list[str], overlap: int,
           schema_id: int | None = None) -> int:
    """Hand out the dataset's units of ``kind`` so each has ``overlap`` distinct users.

    rate: one unit per response; rank: one per prompt with >= 2 responses (all of them; prompts
    with fewer are left out until they have more);
    label: one per item, with label schema ``schema_id``. Deterministic and balanced:
    units in id order, each to the least-loaded users not yet on it, ties broken
    round-robin. Units that already have ``overlap`` users are left alone, so running it
    again changes nothing. Returns how many assignments were created.
    """
    _choice(kind, "kind", ASSIGNMENT_KINDS)
    if not isinstance(usernames, list) or not usernames or not all(isinstance(u, str) for u in usernames):
        raise Invalid("usernames", "must be a non-empty list of usernames")
    names = list(dict.fromkeys(usernames))  # de-duplicated, order kept
    overlap = _int(overlap, "overlap", minimum=1)
    if overlap > len(names):
        raise Invalid("overlap", f"{overlap} users per unit but only {len(names)} users given")
    if kind == "label" and schema_id is None:
        raise Invalid("schema_id", "label assignments need a label schema")
    if kind != "label" and schema_id is not None:
        raise Invalid("schema_id", f"only label assignments take a schema, not {kind}")
    with store.session() as s:
        ds = _dataset(s, dataset_id)
        if schema_id is not None:
            _get(s, LabelSchema, schema_id, "label schema", field="schema_id")
        users = {u.username: u for u in s.scalars(select(User).where(User.username.in_(names)))}
        missing = [n for n in names if n not in users]
        if missing:
            raise Invalid("usernames", f"no such user: {', '.join(missing)}")
        allowed = LABEL_ROLES if kind == "label" else RATE_ROLES
        wrong = [n for n in names if users[n].role not in allowed]
        if wrong:
            raise Invalid("usernames", f"{', '.join(f'{n} ({users[n].role})' for n in wrong)} cannot do {kind} "
                                       f"work; it needs the role {' or '.join(allowed)}")
        units = _units(s, ds, kind)
        if not units:
            what = "items" if kind == "label" else ("responses" if kind == "rate" else "prompts")
            raise Invalid("dataset_id", f"dataset {ds.name!r} has no {what} to assign")

        ids = [users[n].id for n in names]
        existing = s.execute(select(Assignment.unit_id, Assignment.user_id)
                             .where(Assignment.kind == kind, Assignment.dataset_id == ds.id)).all()
        on_unit: dict[int, set[int]] = defaultdict(set)
        for unit, uid in existing:
            on_unit[unit].add(uid)
        load = dict.fromkeys(ids, 0)
        for uid, n in s.execute(select(Assignment.user_id, func.count()).where(
                Assignment.kind == kind, Assignment.dataset_id == ds.id, Assignment.user_id.in_(ids))
                .group_by(Assignment.user_id)):
            load[uid] = n
        column = {"rate": "response_id", "rank": "prompt_id", "label": "item_id"}[kind]
        cursor, rows = 0, []
        for unit in units:
            need = overlap - len(on_unit[unit])
            if need <= 0:
                continue
            candidates = [i for i in range(len(ids)) if ids[i] not in on_unit[unit]]
            # least loaded first; among equals, the next in round-robin order from the cursor
            candidates.sort(key=lambda i: (load[ids[i]], (i - cursor) % len(ids)))
            for i in candidates[:need]:
                uid = ids[i]
                rows.append({"user_id": uid, "kind": kind, "dataset_id": ds.id, "unit_id": unit, column: unit,
                             "schema_id": schema_id, "status": "pending", "created_at": utcnow()})
                load[uid] += 1
                on_unit[unit].add(uid)
                cursor = (i + 1) % len(ids)
        if rows:
            try:
                s.execute(insert(Assignment), rows)
            except IntegrityError as e:
                raise Conflict("another assign() for the same units ran at the same time; run it again") from e
        return len(rows)


def _progress_of(s: Session, user_id: int, kind: str) -> dict[str, int]:
    total, done = s.execute(select(func.count(), func.coalesce(func.sum(case((Assignment.status == "done", 1),
                                                                               else_=0)), 0))
                            .where(Assignment.user_id == user_id, Assignment.kind == kind)).one()
    return {"done": int(done), "total": int(total)}


def next_assignment(store: Store, user_id: int, kind: str) -> dict[str, Any] | None:
    """The user's oldest pending assignment of ``kind`` with what to show, or None when
    all are done. Model ids are never shown (blind review); rank responses are shuffled
    with the assignment id as seed (stable across reloads, different across units)."""
    _choice(kind, "kind", ASSIGNMENT_KINDS)
    with store.session(write=False) as s:
        a = s.scalar(select(Assignment).where(Assignment.user_id == user_id, Assignment.kind == kind,
                                              Assignment.status == "pending").order_by(Assignment.id).limit(1))
        if a is None:
            return None
        out: dict[str, Any] = {"assignment_id": a.id, "kind": kind, "dataset_id": a.dataset_id}
        if kind == "rate":
            r = s.get(Response, a.response_id)
            p = s.get(Prompt, r.prompt_id)
            out["prompt"] = {"id": p.id, "messages": p.messages}
            out["response"] = {"id": r.id, "text": r.text}
        elif kind == "rank":
            p = s.get(Prompt, a.prompt_id)
            responses = [{"id": r.id, "text": r.text} for r in
                         s.scalars(select(Response).where(Response.prompt_id == p.id).order_by(Response.id))]
            random.Random(a.id).shuffle(responses)
            out["prompt"] = {"id": p.id, "messages": p.messages}
            out["responses"] = responses
        else:
            item = s.get(Item, a.item_id)
            schema = s.get(LabelSchema, a.schema_id)
            out["item"] = {"id": item.id, "text": item.text}
            out["schema"] = {"id": schema.id, "name": schema.name, "fields": schema.fields}
        out["progress"] = _progress_of(s, user_id, kind)
        return out


def _claim(s: Session, user_id: int, assignment_id: int, kind: str) -> Assignment:
    """The assignment, locked for this transaction, checked to be the user's and of ``kind``."""
    if isinstance(assignment_id, bool) or not isinstance(assignment_id, int):
        raise Invalid("assignment_id", f"must be an integer id, got {_type(assignment_id)}")
    a = s.scalar(select(Assignment).where(Assignment.id == assignment_id).with_for_update())
    if a is None:
        raise NotFound(f"no assignment with id {assignment_id}")
    if a.user_id != user_id:  # the same answer as for a missing id: ids do not tell what exists
        raise NotFound(f"no assignment with id {assignment_id}")
    if a.kind != kind:
        raise Invalid("assignment_id", f"assignment {assignment_id} is a {a.kind} assignment, not {kind}")
    return a


def _complete(s: Session, a: Assignment, result: Any) -> None:
    if a.status == "done":
        raise Conflict(f"assignment {a.id} was already submitted")
    a.status, a.done_at = "done", utcnow()
    s.add(result)
    try:
        s.flush()
    except IntegrityError as e:  # the unique assignment_id of the result: a concurrent double submit
        raise Conflict(f"assignment {a.id} was already submitted") from e


def submit_rating(store: Store, user_id: int, assignment_id: int, scores: dict[str, int],
                  comment: str | None = None) -> None:
    """Rate the assignment's response 1-5 on each of ``RATING_ASPECTS``."""
    if not isinstance(scores, dict):
        raise Invalid("scores", f"must be an object of {', '.join(RATING_ASPECTS)}")
    unknown = [k for k in scores if k not in RATING_ASPECTS]
    if unknown:
        raise Invalid(str(unknown[0]), f"is not a rating aspect; the aspects are {', '.join(RATING_ASPECTS)}")
    values = {}
    for aspect in RATING_ASPECTS:
        if aspect not in scores:
            raise Invalid(aspect, "missing: rate it from 1 to 5")
        v = scores[aspect]
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 5:
            raise Invalid(aspect, f"must be a whole number from 1 to 5, got {v!r}")
        values[aspect] = v
    comment = _opt_text(comment, "comment", MAX_COMMENT_CHARS)
    with store.session() as s:
        a = _claim(s, user_id, assignment_id, "rate")
        _complete(s, a, Rating(assignment_id=a.id, user_id=user_id, response_id=a.response_id,
                               comment=comment or None, **values))


def submit_ranking(store: Store, user_id: int, assignment_id: int, order: list[int]) -> None:
    """Rank the assignment's responses: ``order`` lists every response id, best first."""
    if not isinstance(order, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in order):
        raise Invalid("order", "must be a list of response ids, best first")
    if len(set(order)) != len(order):
        raise Invalid("order", "lists a response twice")
    with store.session() as s:
        a = _claim(s, user_id, assignment_id, "rank")
        ids = set(s.scalars(select(Response.id).where(Response.prompt_id == a.prompt_id)))
        missing, extra = sorted(ids - set(order)), sorted(set(order) - ids)
        if extra:
            raise Invalid("order", f"response ids {extra} do not answer this prompt")
        if missing:
            raise Invalid("order", f"must rank every response; missing ids {missing}")
        _complete(s, a, Ranking(assignment_id=a.id, user_id=user_id, prompt_id=a.prompt_id, order=list(order)))


def _check_label(fields: list[dict[str, Any]], value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise Invalid("value", f"must be an object of the schema's fields, got {_type(value)}")
    names = [f["name"] for f in fields]
    unknown = [k for k in value if k not in names]
    if unknown:
        raise Invalid(f"value.{unknown[0]}", f"is not a field of this schema; fields: {', '.join(names)}")
    out = {}
    for f in fields:
        name, at = f["name"], f"value.{f['name']}"
        v = value.get(name)
        if v is None or (f["type"] == "text" and isinstance(v, str) and not v.strip()):
            if f.get("required"):
                raise Invalid(at, "is required")
            out[name] = None
            continue
        if f["type"] == "choice" and v not in f["options"]:
            raise Invalid(at, f"{v!r} is not one of: {', '.join(f['options'])}")
        if f["type"] == "bool" and not isinstance(v, bool):
            raise Invalid(at, f"must be true or false, got {v!r}")
        if f["type"] == "text":
            v = _text(v, at, MAX_COMMENT_CHARS)
        out[name] = v
    return out


def submit_label(store: Store, user_id: int, assignment_id: int, value: dict[str, Any]) -> None:
    """Label the assignment's item: ``value`` maps schema field names to values."""
    with store.session() as s:
        a = _claim(s, user_id, assignment_id, "label")
        schema = s.get(LabelSchema, a.schema_id)
        checked = _check_label(schema.fields, value)
        _complete(s, a, Label(assignment_id=a.id, user_id=user_id, item_id=a.item_id, schema_id=schema.id,
                              value=checked))


# --------------------------------------------------------------------------- progress and agreement


def progress(store: Store) -> list[dict[str, Any]]:
    """Done/total assignments per dataset, kind and user."""
    with store.session(write=False) as s:
        rows = s.execute(
            select(Dataset.id, Dataset.name, Assignment.kind, User.username, func.count(),
                   func.coalesce(func.sum(case((Assignment.status == "done", 1), else_=0)), 0))
            .join(Dataset, Dataset.id == Assignment.dataset_id).join(User, User.id == Assignment.user_id)
            .group_by(Dataset.id, Dataset.name, Assignment.kind, User.username)
            .order_by(Dataset.id, Assignment.kind, User.username))
        return [{"dataset_id": did, "dataset": name, "kind": kind, "username": username, "done": int(done),
                 "total": int(total)} for did, name, kind, username, total, done in rows]


def _rank_agreement(units: Iterable[list[list[int]]]) -> dict[str, Any]:
    agree = total = 0
    ws = []
    for orders in units:
        a, t = pairwise_agreement(orders)
        agree, total = agree + a, total + t
        items = sorted(set(orders[0]).intersection(*orders[1:]))
        if len(items) >= 2:  # Kendall's W needs the same items in every ranking
            ranks = []
            for o in orders:
                rank_of = {x: i + 1 for i, x in enumerate(x for x in o if x in items)}
                ranks.append([rank_of[x] for x in items])
            ws.append(kendall_w(ranks))
    return {"pairwise_agreement": _num(agree / total) if total else None,
            "kendall_w": _num(sum(ws) / len(ws)) if ws else None}


def _label_field_agreement(units: list[list[tuple[int, Any]]]) -> dict[str, Any]:
    values = [[v for _, v in u] for u in units]
    out: dict[str, Any] = {"krippendorff_alpha": _num(krippendorff_alpha(values, "nominal")), "n_units": len(units)}
    counts = {len(u) for u in units}
    raters = {tuple(sorted(uid for uid, _ in u)) for u in units}
    if counts == {2} and len(raters) == 1:  # the same two people on every unit: Cohen's kappa
        a_id = next(iter(raters))[0]
        a = [next(v for uid, v in u if uid == a_id) for u in units]
        b = [next(v for uid, v in u if uid != a_id) for u in units]
        out["cohen_kappa"] = _num(cohen_kappa(a, b))
    elif len(counts) == 1:  # a fixed number of raters per unit: Fleiss' kappa
        out["fleiss_kappa"] = _num(fleiss_kappa(units=values))
    return out


def agreement(store: Store, dataset_id: int) -> dict[str, Any]:
    """Inter-rater agreement on a dataset, from the units rated by at least 2 people.

    ``rate``: Krippendorff's alpha (interval) per aspect; ``rank``: the share of
    response pairs two raters order the same way, and the mean Kendall's W; ``label``:
    per choice/bool field, Krippendorff's alpha (nominal) plus Cohen's kappa (the same
    two raters throughout) or Fleiss' kappa (a fixed number of raters). A section is
    absent when no unit has 2 raters; a coefficient is None when undefined (no
    variation at all). ``n_units`` counts the units each section used.
    """
    with store.session(write=False) as s:
        ds = _dataset(s, dataset_id)
        out: dict[str, Any] = {"dataset_id": ds.id, "dataset": ds.name, "n_units": {}}
        in_dataset = select(Assignment.id).where(Assignment.dataset_id == ds.id).scalar_subquery()

        by_response: dict[int, list[Rating]] = defaultdict(list)
        for r in s.scalars(select(Rating).where(Rating.assignment_id.in_(in_dataset)).order_by(Rating.id)):
            by_response[r.response_id].append(r)
        rate_units = [rs for rs in by_response.values() if len(rs) >= 2]
        out["n_units"]["rate"] = len(rate_units)
        if rate_units:
            out["rate"] = {aspect: _num(krippendorff_alpha([[getattr(r, aspect) for r in rs] for rs in rate_units],
                                                           "interval"))
                           for aspect in RATING_ASPECTS}

        by_prompt: dict[int, list[list[int]]] = defaultdict(list)
        for rk in s.scalars(select(Ranking).where(Ranking.assignment_id.in_(in_dataset)).order_by(Ranking.id)):
            by_prompt[rk.prompt_id].append(rk.order)
        rank_units = [orders for orders in by_prompt.values() if len(orders) >= 2]
        out["n_units"]["rank"] = len(rank_units)
        if rank_units:
            out["rank"] = _rank_agreement(rank_units)

        by_item: dict[tuple[int, int], list[Label]] = defaultdict(list)
        for lb in s.scalars(select(Label).where(Label.assignment_id.in_(in_dataset)).order_by(Label.id)):
            by_item[(lb.schema_id, lb.item_id)].append(lb)
        schemas = {x.id: x for x in s.scalars(select(LabelSchema).where(
            LabelSchema.id.in_({sid for sid, _ in by_item})))}
        label_units = {k: v for k, v in by_item.items() if len(v) >= 2}
        out["n_units"]["label"] = len(label_units)
        label: dict[str, Any] = {}
        for sid, schema in schemas.items():
            for f in schema.fields:
                if f["type"] == "text":  # free text has no categories to agree on
                    continue
                units = [[(lb.user_id, lb.value.get(f["name"])) for lb in labels]
                         for (schema_id, _), labels in label_units.items() if schema_id == sid]
                units = [[(uid, v) for uid, v in u if v is not None] for u in units]
                units = [u for u in units if len(u) >= 2]
                if units:
                    key = f["name"] if len(schemas) == 1 else f"{schema.name}.{f['name']}"
                    label[key] = _label_field_agreement(units)
        if label:
            out["label"] = label
        return out


# --------------------------------------------------------------------------- safety flags

FLAG_DECISIONS = ("confirmed", "cleared")
FLAG_ROLES = ("reviewer", "admin")
CATEGORY_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")  # a policy category name (it becomes a label)
MAX_FLAGS_LISTED = 200


def _storable(value: Any) -> Any:
    """JSON with the characters no backend stores (``UNSTORABLE``) removed from every string: flags hold
    model output and text exactly as clients sent it, which the guard looked at before any other check."""
    if isinstance(value, str):
        return UNSTORABLE.sub("", value)
    if isinstance(value, list):
        return [_storable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _storable(v) for k, v in value.items()}
    return value


def _category(value: Any, field: str) -> str:
    if not isinstance(value, str) or not CATEGORY_RE.match(value) or value == "safe":
        raise Invalid(field, f"{value!r} is not a category name (lower_snake_case, not 'safe')")
    return value


def flag_text(place: str, prompt: list[dict[str, Any]], answer_generated: str | None) -> str:
    """The text a flag is about: the latest user message for a prompt flag, the answer as generated for an
    answer flag (what the moderation classifier learns from)."""
    if place == "answer":
        return answer_generated or ""
    return next((str(m.get("content", "")) for m in reversed(prompt) if m.get("role") == "user"), "")


def record_flag(store: Store, *, place: str, category: str, layer: str, action: str,
                findings: list[dict[str, Any]], prompt: list[dict[str, Any]], answer_generated: str | None = None,
                answer_delivered: str | None = None, source: str = "api", policy: str | None = None,
                model_id: str | None = None, model_version: str | None = None, conversation_id: int | None = None,
                message_id: int | None = None, ident: str | None = None) -> int:
    """Store one flagged exchange (pending review); returns its id."""
    _choice(place, "place", FLAG_PLACES)
    _choice(source, "source", ("api", "web"))
    if not isinstance(findings, list) or not isinstance(prompt, list):
        raise Invalid("findings" if not isinstance(findings, list) else "prompt", "must be a list")
    row = SafetyFlag(
        source=source, place=place, category=_text(category, "category", 64), layer=_text(layer, "layer", 16,
                                                                                          allow_empty=True),
        action=_text(action, "action", 16), findings=_storable(findings), prompt=_storable(prompt),
        policy=_opt_text(policy, "policy", MAX_NAME_CHARS),
        answer_generated=None if answer_generated is None else _text(answer_generated, "answer_generated",
                                                                     allow_empty=True, generated=True),
        answer_delivered=None if answer_delivered is None else _text(answer_delivered, "answer_delivered",
                                                                     allow_empty=True, generated=True),
        model_id=_opt_text(model_id, "model_id", MAX_NAME_CHARS), model_version=_opt_text(model_version,
                                                                                          "model_version", 64),
        conversation_id=conversation_id, message_id=message_id, ident=_opt_text(ident, "ident", MAX_NAME_CHARS),
        status="pending")
    with store.session() as s:
        s.add(row)
        s.flush()
        return row.id


def _flag_dict(f: SafetyFlag, users: dict[int, str]) -> dict[str, Any]:
    return {"id": f.id, "created_at": _iso(f.created_at), "source": f.source, "place": f.place,
            "category": f.category, "layer": f.layer, "action": f.action, "findings": f.findings,
            "policy": f.policy, "prompt": f.prompt, "text": flag_text(f.place, f.prompt, f.answer_generated),
            "answer_generated": f.answer_generated, "answer_delivered": f.answer_delivered,
            "model_id": f.model_id, "model_version": f.model_version, "conversation_id": f.conversation_id,
            "message_id": f.message_id, "ident": f.ident, "status": f.status,
            "reviewer": users.get(f.reviewer_id) if f.reviewer_id is not None else None,
            "reviewed_at": _iso(f.reviewed_at), "reviewer_category": f.reviewer_category}


def list_flags(store: Store, status: str | None = "pending", limit: int = 50) -> list[dict[str, Any]]:
    """Flags with ``status`` (None: all), oldest first, at most ``limit`` (up to ``MAX_FLAGS_LISTED``)."""
    if status is not None:
        _choice(status, "status", FLAG_STATUSES)
    limit = _int(limit, "limit", 1)
    with store.session(write=False) as s:
        q = select(SafetyFlag)
        if status is not None:
            q = q.where(SafetyFlag.status == status)
        rows = list(s.scalars(q.order_by(SafetyFlag.id).limit(min(limit, MAX_FLAGS_LISTED))))
        users = _usernames_of(s, {f.reviewer_id for f in rows if f.reviewer_id is not None})
        return [_flag_dict(f, users) for f in rows]


def next_flag(store: Store) -> dict[str, Any] | None:
    """The oldest pending flag, or None."""
    found = list_flags(store, "pending", 1)
    return found[0] if found else None


def flag_counts(store: Store) -> dict[str, int]:
    """How many flags have each status."""
    with store.session(write=False) as s:
        got = dict(s.execute(select(SafetyFlag.status, func.count()).group_by(SafetyFlag.status)).all())
    return {st: int(got.get(st, 0)) for st in FLAG_STATUSES}


def _usernames_of(s: Session, ids: set[int]) -> dict[int, str]:
    if not ids:
        return {}
    return dict(s.execute(select(User.id, User.username).where(User.id.in_(ids))).all())


def decide_flag(store: Store, flag_id: int, reviewer_id: int, decision: str,
                category: str | None = None) -> dict[str, Any]:
    """A reviewer's decision on a pending flag: ``confirmed`` (it is ``category``, default the flag's own)
    or ``cleared`` (a false alarm: the text is safe). A flag is decided once: deciding it again is a
    ``Conflict`` naming who decided it (two reviewers racing get one decision and one Conflict)."""
    _choice(decision, "decision", FLAG_DECISIONS)
    if category is not None:
        category = _category(category, "category")
    with store.session() as s:
        reviewer = _get(s, User, reviewer_id, "user", field="reviewer_id")
        if reviewer.role not in FLAG_ROLES:
            raise Forbidden(f"deciding safety flags needs the role {' or '.join(FLAG_ROLES)}; user "
                            f"{reviewer.username!r} is {reviewer.role}")
        flag = _get(s, SafetyFlag, flag_id, "safety flag", field="flag_id")
        chosen = (category or flag.category) if decision == "confirmed" else None
        done = s.execute(update(SafetyFlag).where(SafetyFlag.id == flag.id, SafetyFlag.status == "pending")
                         .values(status=decision, reviewer_id=reviewer.id, reviewed_at=utcnow(),
                                 reviewer_category=chosen)
                         .execution_options(synchronize_session=False))
        if done.rowcount != 1:
            s.refresh(flag)
            by = _usernames_of(s, {flag.reviewer_id} if flag.reviewer_id is not None else set())
            raise Conflict(f"safety flag {flag.id} was already decided ({flag.status} by "
                           f"{by.get(flag.reviewer_id, 'someone')})")
        s.refresh(flag)
        return _flag_dict(flag, {reviewer.id: reviewer.username})
