"""The feedback store: migrations, SQLite setup, accounts, chats, review work, concurrency, CLI."""

from __future__ import annotations

import argparse
import json
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from db_backends import BACKENDS, fresh_database
from sqlalchemy import Column, Integer, MetaData, inspect, select, text
from sqlalchemy.exc import IntegrityError

from chatforge.errors import ChatforgeError
from chatforge.eval.agreement import cohen_kappa, fleiss_kappa, krippendorff_alpha
from chatforge.store import Store, default_db_url
from chatforge.store import service as sv
from chatforge.store.cli import add_feedback_parser
from chatforge.store.models import (
    Assignment,
    Base,
    LoginSession,
    Message,
    Prompt,
    Rating,
    Response,
    User,
    utcnow,
)

SCORES = {"fluency": 4, "coherence": 4, "relevance": 5, "appropriateness": 5}
HOSTILE = ["'; DROP TABLE users; --", "<script>alert(1)</script>", "Robert'); DELETE FROM messages;--",
           "ünïcødé ✓ 日本語 \"quotes\" \\backslash\\ %s %(x)s ?"]


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    """Each test taking ``url`` or ``store`` runs on SQLite and on PostgreSQL (see tests/db_backends.py)."""
    return request.param


@pytest.fixture
def url(backend: str, tmp_path: Path) -> str:
    with fresh_database(backend, tmp_path) as db_url:
        yield db_url


@pytest.fixture
def store(url: str) -> Store:
    s = Store(url)
    yield s
    s.close()


def users(store: Store, *specs: str) -> list[dict]:
    """``name:role`` specs -> created users (password 'pw-<name>')."""
    out = []
    for spec in specs:
        name, role = spec.split(":")
        out.append(sv.create_user(store, name, f"pw-{name}", role))
    return out


def prompts_with_responses(store: Store, owner: int, n_prompts: int, per_prompt: int, name: str = "p") -> int:
    ds = sv.import_dataset(store, name, "prompts", [{"prompt": f"question {i}"} for i in range(n_prompts)], owner)
    for k in range(per_prompt):
        for p in sv.prompts_needing_responses(store, ds["id"], f"model-{k}", 1):
            sv.add_response(store, p["id"], f"model-{k}", "v1", f"answer {k} to prompt {p['id']}")
    return ds["id"]


# --------------------------------------------------------------------------- schema and database


def test_migration_matches_models_and_upgrade_is_idempotent(url, store):
    with store.engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(ctx, Base.metadata) == []
        # the comparison can fail: a model with a column the migration lacks is reported
        changed = MetaData()
        for table in Base.metadata.tables.values():
            table.to_metadata(changed)
        changed.tables["users"].append_column(Column("nickname", Integer))
        diff = compare_metadata(ctx, changed)
        assert [d[0] for d in diff] == ["add_column"] and diff[0][3].name == "nickname"
    head = store.head_revision()
    assert store.current_revision() == head == "0002"

    admin = sv.create_user(store, "admin", "pw", "admin")
    tables = set(inspect(store.engine).get_table_names())
    assert {"users", "messages", "assignments", "ratings", "rankings", "labels", "alembic_version"} <= tables
    # opening again (a second process, a restart) and upgrading explicitly change nothing
    again = Store(url)
    assert again.upgrade() == head
    assert set(inspect(again.engine).get_table_names()) == tables
    assert sv.list_users(again)[0]["username"] == admin["username"]
    with again.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM alembic_version")).scalar() == 1
    again.close()


def test_sqlite_pragmas_foreign_keys_and_checks(store):
    if store.is_sqlite:
        with store.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    with pytest.raises(IntegrityError), store.session() as s:
        s.add(Prompt(dataset_id=12345, messages=[{"role": "user", "content": "x"}]))
    with pytest.raises(IntegrityError), store.session() as s:  # CHECK constraint on the role
        s.add(User(username="x", password_hash="h", role="superuser"))


def test_store_urls(tmp_path):
    assert default_db_url(Path("runs/default")) == "sqlite:///runs/default/feedback.db"
    nested = Store(default_db_url(tmp_path / "a" / "b"))  # parent folders are created
    assert (tmp_path / "a" / "b" / "feedback.db").is_file()
    nested.close()
    mem = Store("sqlite://")  # in-memory: one shared connection, still migrated
    solo = sv.create_user(mem, "solo", "pw", "admin")
    assert [u["username"] for u in sv.list_users(mem)] == ["solo"]
    cids = [sv.create_conversation(mem, solo["id"], "m") for _ in range(4)]
    errors: list[BaseException] = []

    def chat(cid: int) -> None:  # threads take turns on the shared connection
        try:
            for k in range(20):
                sv.add_message(mem, cid, "user", f"turn {k}")
                sv.get_conversation(mem, solo["id"], cid)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=chat, args=(cid,)) for cid in cids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and [len(sv.get_conversation(mem, solo["id"], c)["messages"]) for c in cids] == [20] * 4
    with pytest.raises(ChatforgeError, match="not a valid SQLAlchemy URL"):
        Store("not a url")
    with pytest.raises(ChatforgeError, match="no driver"):
        Store("postgresql+nosuchdriver://u:secret@localhost/db")


# --------------------------------------------------------------------------- accounts


def test_users_and_passwords(store):
    alice = sv.create_user(store, "alice", "correct horse", "reviewer")
    assert alice == {"id": alice["id"], "username": "alice", "role": "reviewer"}
    with pytest.raises(sv.Conflict, match="alice"):
        sv.create_user(store, "alice", "other", "admin")
    with pytest.raises(sv.Invalid) as e:
        sv.create_user(store, "bob", "pw", "owner")
    assert e.value.field == "role"
    with pytest.raises(sv.Invalid) as e:
        sv.create_user(store, "bob smith", "pw", "admin")
    assert e.value.field == "username"
    with pytest.raises(sv.Invalid) as e:
        sv.create_user(store, "bob", "", "admin")
    assert e.value.field == "password"

    assert sv.authenticate(store, "alice", "correct horse") == alice
    assert sv.authenticate(store, "alice", "correct horsE") is None
    assert sv.authenticate(store, "nobody", "correct horse") is None
    sv.create_user(store, "carol", "correct horse", "annotator")
    with store.session(write=False) as s:
        hashes = list(s.scalars(select(User.password_hash).order_by(User.id)))
    assert all(h.startswith("scrypt$") and "correct horse" not in h for h in hashes)
    assert hashes[0].split("$")[4] != hashes[1].split("$")[4]  # per-user salt
    assert hashes[0] != hashes[1]


def test_roles(store):
    admin, rev = users(store, "admin:admin", "rev:reviewer")
    assert sv.set_role(store, "rev", "admin")["role"] == "admin"
    assert sv.set_role(store, "admin", "reviewer")["role"] == "reviewer"  # rev is still admin
    with pytest.raises(sv.Conflict, match="last admin"):
        sv.set_role(store, "rev", "annotator")
    with pytest.raises(sv.NotFound):
        sv.set_role(store, "ghost", "admin")
    assert [(u["username"], u["role"]) for u in sv.list_users(store)] == [("admin", "reviewer"), ("rev", "admin")]


def test_sessions_store_only_hashes(store):
    (alice,) = users(store, "alice:reviewer")
    token = sv.create_session(store, alice["id"])
    assert len(token) >= 40
    assert sv.user_for_session(store, token) == alice
    with store.session(write=False) as s:
        stored = s.scalars(select(LoginSession.token_hash)).all()
    assert stored and token not in stored and all(len(h) == 64 for h in stored)
    assert sv.user_for_session(store, token + "x") is None
    assert sv.user_for_session(store, None) is None
    sv.end_session(store, token)
    assert sv.user_for_session(store, token) is None
    old = sv.create_session(store, alice["id"], ttl=timedelta(seconds=-1))  # already expired
    assert sv.user_for_session(store, old) is None
    with store.session(write=False) as s:
        assert s.scalar(select(LoginSession.id)) is None  # the expired session was removed
    with pytest.raises(sv.NotFound):
        sv.create_session(store, 999)


def _set_session(store, token: str, **values) -> None:
    with store.session() as s:
        row = s.scalar(select(LoginSession).where(LoginSession.token_hash == sv._sha256(token)))
        for k, v in values.items():
            setattr(row, k, v)


def _expires_at(store, token: str):
    with store.session(write=False) as s:
        return s.scalar(select(LoginSession.expires_at).where(LoginSession.token_hash == sv._sha256(token)))


def test_session_idle_timeout_slides_and_has_a_cap(store):
    (alice,) = users(store, "alice:reviewer")
    idle = timedelta(minutes=10)
    token = sv.create_session(store, alice["id"], idle=idle)
    now = utcnow()
    assert now < _expires_at(store, token) <= now + idle  # the idle deadline, not 7 days
    _set_session(store, token, expires_at=now + timedelta(minutes=1))  # as if unused for 9 minutes
    assert sv.user_for_session(store, token, idle) == alice
    assert _expires_at(store, token) >= now + timedelta(minutes=9)  # used: the deadline moved on
    _set_session(store, token, created_at=now - sv.SESSION_TTL + timedelta(minutes=2),
                 expires_at=now + timedelta(seconds=30))
    assert sv.user_for_session(store, token, idle) == alice
    assert _expires_at(store, token) <= now + timedelta(minutes=2, seconds=1)  # never past created + 7 days
    _set_session(store, token, expires_at=now - timedelta(seconds=1))  # unused past the idle timeout
    assert sv.user_for_session(store, token, idle) is None


def test_end_user_sessions_logs_out_everywhere(store):
    alice, bob = users(store, "alice:reviewer", "bob:reviewer")
    tokens = [sv.create_session(store, alice["id"]) for _ in range(3)]
    other = sv.create_session(store, bob["id"])
    assert sv.end_user_sessions(store, alice["id"]) == 3
    assert all(sv.user_for_session(store, t) is None for t in tokens)
    assert sv.user_for_session(store, other) == bob


def test_api_keys(store):
    (alice,) = users(store, "alice:admin")
    key = sv.create_api_key(store, alice["id"])
    assert key.startswith("cf-") and len(key) > 40
    assert sv.user_for_api_key(store, key) == alice
    assert sv.user_for_api_key(store, key[:-1]) is None
    assert sv.user_for_api_key(store, "") is None
    with store.engine.connect() as conn:
        key_hash, last_used = conn.execute(text("SELECT key_hash, last_used FROM api_keys")).one()
    assert key not in key_hash and last_used is not None
    assert sv.create_api_key(store, alice["id"]) != key


# --------------------------------------------------------------------------- chat


def test_finish_reason_is_kept(store):
    alice = sv.create_user(store, "alice-fr", "pw", "reviewer")
    cid = sv.create_conversation(store, alice["id"], "run-sft")
    sv.add_message(store, cid, "user", "Where is my parcel?")
    mid = sv.add_message(store, cid, "assistant", "It is on its w", model_id="run-sft", finish_reason="cancelled")
    last = sv.get_conversation(store, alice["id"], cid)["messages"][-1]
    assert (last["id"], last["content"], last["finish_reason"]) == (mid, "It is on its w", "cancelled")


def test_conversations_and_ownership(store):
    alice, bob = users(store, "alice:reviewer", "bob:annotator")
    cid = sv.create_conversation(store, alice["id"], "run-sft", system="Be brief.")
    u1 = sv.add_message(store, cid, "user", "  Where is   my parcel?  ")
    a1 = sv.add_message(store, cid, "assistant", "It ships today.", model_id="run-sft", model_version="abc123")
    a2 = sv.add_message(store, cid, "assistant", "Tomorrow.", model_id="run-sft", model_version="abc123")
    u2 = sv.add_message(store, cid, "user", "Thanks")
    conv = sv.get_conversation(store, alice["id"], cid)
    assert conv["system"] == "Be brief." and conv["model_id"] == "run-sft"
    msgs = conv["messages"]
    assert [m["id"] for m in msgs] == [u1, a1, a2, u2]
    # a regenerated answer is a sibling: both answer u1; the next user turn follows the latest answer
    assert [m["parent_id"] for m in msgs] == [None, u1, u1, a2]
    assert msgs[1]["model_version"] == "abc123" and msgs[1]["thumb"] is None
    assert set(msgs[0]) == {"id", "role", "content", "model_id", "model_version", "parent_id", "finish_reason",
                            "thumb", "comment", "created_at"}
    assert msgs[1]["finish_reason"] is None
    listed = sv.list_conversations(store, alice["id"])
    assert listed == [{"id": cid, "title": "Where is my parcel?", "model_id": "run-sft",
                       "created_at": conv["created_at"]}]
    assert conv["created_at"].endswith("+00:00")  # UTC, ISO 8601
    assert sv.list_conversations(store, bob["id"]) == []
    with pytest.raises(sv.NotFound, match=f"no conversation with id {cid}$"):  # as if it did not exist
        sv.get_conversation(store, bob["id"], cid)
    with pytest.raises(sv.NotFound):
        sv.get_conversation(store, alice["id"], 999)

    sv.set_message_feedback(store, alice["id"], a1, -1, "wrong day")
    sv.set_message_feedback(store, alice["id"], a2, 1, None)
    sv.set_message_feedback(store, alice["id"], a2, 1, "better")  # again: replaced, not duplicated
    msgs = sv.get_conversation(store, alice["id"], cid)["messages"]
    assert [(m["thumb"], m["comment"]) for m in msgs] == [(None, None), (-1, "wrong day"), (1, "better"),
                                                          (None, None)]
    with pytest.raises(sv.NotFound, match=f"no message with id {a1}$"):
        sv.set_message_feedback(store, bob["id"], a1, 1, None)
    with pytest.raises(sv.Invalid) as e:
        sv.set_message_feedback(store, alice["id"], a1, 2, None)
    assert e.value.field == "thumb"
    with pytest.raises(sv.Invalid) as e:
        sv.set_message_feedback(store, alice["id"], u1, 1, None)
    assert e.value.field == "message_id"
    with pytest.raises(sv.Invalid) as e:
        sv.add_message(store, cid, "tool", "x")
    assert e.value.field == "role"
    other = sv.create_conversation(store, bob["id"], "m")
    with pytest.raises(sv.Invalid) as e:
        sv.add_message(store, other, "assistant", "x", parent_id=u1)
    assert e.value.field == "parent_id"


def test_hostile_strings_round_trip_verbatim(store):
    (admin,) = users(store, "admin:admin")
    cid = sv.create_conversation(store, admin["id"], HOSTILE[0], system=HOSTILE[1])
    ids = [sv.add_message(store, cid, role, s) for role, s in zip(["user", "assistant"] * 2, HOSTILE)]
    sv.set_message_feedback(store, admin["id"], ids[1], 1, HOSTILE[0])
    conv = sv.get_conversation(store, admin["id"], cid)
    assert conv["model_id"] == HOSTILE[0] and conv["system"] == HOSTILE[1]
    assert [m["content"] for m in conv["messages"]] == HOSTILE
    assert conv["messages"][1]["comment"] == HOSTILE[0]
    ds = sv.import_dataset(store, HOSTILE[0], "items", [{"text": s, "meta": {"k": s}} for s in HOSTILE], admin["id"])
    assert [d["name"] for d in sv.list_datasets(store)] == [HOSTILE[0]]
    sid = sv.create_label_schema(store, HOSTILE[1], [{"name": "note", "type": "text"}])
    sv.assign(store, ds["id"], "label", ["admin"], 1, schema_id=sid)
    task = sv.next_assignment(store, admin["id"], "label")
    assert task["item"]["text"] == HOSTILE[0] and task["schema"]["name"] == HOSTILE[1]
    sv.submit_label(store, admin["id"], task["assignment_id"], {"note": HOSTILE[2]})
    with store.engine.connect() as conn:  # every table is still there
        assert conn.execute(text("SELECT count(*) FROM users")).scalar() == 1
        assert conn.execute(text("SELECT count(*) FROM messages")).scalar() == 4
        raw = conn.execute(text("SELECT value FROM labels")).scalar()  # JSON text (SQLite) or decoded (PostgreSQL)
        assert (json.loads(raw) if isinstance(raw, str) else raw) == {"note": HOSTILE[2]}


def test_unstorable_characters_one_rule_on_every_backend(store):
    """NUL (PostgreSQL's text type refuses it) and unpaired surrogates (not UTF-8) are refused in
    text a person sent, with the field named, before anything is written; model output (assistant
    messages, responses) is stored with them removed. The same on SQLite and PostgreSQL."""
    admin, bob = users(store, "admin:admin", "bob:reviewer")
    cid = sv.create_conversation(store, bob["id"], "m")
    uid = sv.add_message(store, cid, "user", "hi")
    aid = sv.add_message(store, cid, "assistant", "ok")
    bad_calls = [
        ("content", lambda t: sv.add_message(store, cid, "user", t)),
        ("system", lambda t: sv.create_conversation(store, bob["id"], "m", system=t)),
        ("comment", lambda t: sv.set_message_feedback(store, bob["id"], aid, 1, t)),
        ("rows[0].text", lambda t: sv.import_dataset(store, "items", "items", [{"text": t}], admin["id"])),
        ("rows[0].prompt", lambda t: sv.import_dataset(store, "p1", "prompts", [{"prompt": t}], admin["id"])),
        ("rows[0].messages[1].content", lambda t: sv.import_dataset(
            store, "p2", "prompts", [{"messages": [{"role": "user", "content": "q"},
                                                   {"role": "assistant", "content": t}]}], admin["id"])),
        ("name", lambda t: sv.create_label_schema(store, t, [{"name": "n", "type": "text"}])),
    ]
    for bad, what in (("a\x00b", "a NUL character (character 2)"), ("x\ud800", "an unpaired surrogate (U+D800)")):
        for field, call in bad_calls:
            with pytest.raises(sv.Invalid) as e:
                call(bad)
            assert e.value.field == field and what in str(e.value), (field, str(e.value))
    conv = sv.get_conversation(store, bob["id"], cid)
    assert [m["id"] for m in conv["messages"]] == [uid, aid] and conv["messages"][1]["comment"] is None
    assert sv.list_datasets(store) == [] and sv.list_label_schemas(store) == []

    # model output: the characters are removed, the rest is kept; an answer of NULs is an empty answer
    mid = sv.add_message(store, cid, "assistant", "\x00Hel\x00lo\ud800 ✓", finish_reason="length")
    nothing = sv.add_message(store, cid, "assistant", "\x00\x00\x00", finish_reason="length")
    got = {m["id"]: m["content"] for m in sv.get_conversation(store, bob["id"], cid)["messages"]}
    assert got[mid] == "Hello ✓" and got[nothing] == ""
    assert sv.message_content("assistant", "a\x00") == "a"
    ds = sv.import_dataset(store, "ok", "prompts", [{"prompt": "q"}], admin["id"])
    pid = sv.prompts_needing_responses(store, ds["id"], "m", 1)[0]["id"]
    rid = sv.add_response(store, pid, "m", "v1", "an\x00swer")
    with store.session(write=False) as s:
        assert s.get(Response, rid).text == "answer"


# --------------------------------------------------------------------------- datasets and schemas


def test_import_dataset_validates_every_row(store):
    (admin,) = users(store, "admin:admin")
    ok = sv.import_dataset(store, "mixed", "prompts", [
        {"prompt": "plain text"},
        {"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "reference"}]},
    ], admin["id"])
    assert ok["count"] == 3
    with store.session(write=False) as s:
        stored = list(s.scalars(select(Prompt.messages).order_by(Prompt.id)))
    assert stored[0] == [{"role": "user", "content": "plain text"}]
    assert stored[2] == [{"role": "user", "content": "q"}]  # the reference answer is not part of the prompt

    bad_cases = [
        ("prompts", [{"prompt": "fine"}, {"prompt": "  "}], "rows[1].prompt"),
        ("prompts", [{"messages": [{"role": "robot", "content": "x"}]}], "rows[0].messages"),
        ("prompts", [{"messages": [{"role": "system", "content": "x"}]}], "rows[0].messages"),
        ("prompts", [{"question": "x"}], "rows[0]"),
        ("prompts", ["just a string"], "rows[0]"),
        ("items", [{"text": "a"}, {"text": "b"}, {"txt": "c"}], "rows[2].text"),
        ("items", [{"text": "a", "meta": [1]}], "rows[0].meta"),
        ("things", [{"text": "a"}], "kind"),
        ("items", [], "rows"),
    ]
    for kind, rows, field in bad_cases:
        with pytest.raises(sv.Invalid) as e:
            sv.import_dataset(store, "bad", kind, rows, admin["id"])
        assert e.value.field == field, (rows, e.value)
        assert str(e.value).startswith(field + ":")
    assert [d["name"] for d in sv.list_datasets(store)] == ["mixed"]  # nothing half-imported
    with pytest.raises(sv.Conflict):
        sv.import_dataset(store, "mixed", "items", [{"text": "x"}], admin["id"])
    items = sv.import_dataset(store, "items", "items", [{"text": "a", "meta": {"src": 1}}, {"text": "b"}], admin["id"])
    listed = {d["name"]: d for d in sv.list_datasets(store)}
    assert listed["items"]["count"] == 2 and listed["items"]["kind"] == "items" and listed["items"]["id"] == items["id"]
    assert listed["mixed"]["count"] == 3 and listed["mixed"]["responses"] == 0


def test_label_schemas(store):
    sid = sv.create_label_schema(store, "sentiment", [
        {"name": "sentiment", "type": "choice", "options": ["pos", "neg", "neu"], "required": True},
        {"name": "toxic", "type": "bool"},
        {"name": "note", "type": "text", "description": "anything else"}])
    (schema,) = sv.list_label_schemas(store)
    assert schema["id"] == sid and [f["required"] for f in schema["fields"]] == [True, False, False]
    bad = [
        ([{"name": "s", "type": "choice", "options": ["only"]}], "fields[0].options"),
        ([{"name": "s", "type": "number"}], "fields[0].type"),
        ([{"name": "a", "type": "bool"}, {"name": "a", "type": "text"}], "fields[1].name"),
        ([{"name": "a", "type": "bool", "required": "yes"}], "fields[0].required"),
        ([], "fields"),
    ]
    for fields, field in bad:
        with pytest.raises(sv.Invalid) as e:
            sv.create_label_schema(store, "other", fields)
        assert e.value.field == field
    with pytest.raises(sv.Conflict):
        sv.create_label_schema(store, "sentiment", [{"name": "x", "type": "bool"}])


def test_prompts_needing_responses(store):
    (admin,) = users(store, "admin:admin")
    ds = sv.import_dataset(store, "p", "prompts", [{"prompt": "a"}, {"prompt": "b"}], admin["id"])["id"]
    todo = sv.prompts_needing_responses(store, ds, "m", 2)
    assert [p["id"] for p in todo] == [1, 1, 2, 2]  # one entry per missing response
    assert todo[0]["messages"] == [{"role": "user", "content": "a"}]
    sv.add_response(store, todo[0]["id"], "m", "v", "first")
    assert [p["id"] for p in sv.prompts_needing_responses(store, ds, "m", 2)] == [1, 2, 2]
    assert len(sv.prompts_needing_responses(store, ds, "other-model", 1)) == 2
    with pytest.raises(sv.Invalid) as e:
        sv.prompts_needing_responses(store, ds, "m", 0)
    assert e.value.field == "per_model"
    items = sv.import_dataset(store, "i", "items", [{"text": "x"}], admin["id"])["id"]
    with pytest.raises(sv.Invalid, match="holds items"):
        sv.prompts_needing_responses(store, items, "m", 1)
    with pytest.raises(sv.NotFound):
        sv.add_response(store, 999, "m", "v", "x")


# --------------------------------------------------------------------------- assignments


def test_assign_overlap_balance_and_idempotence(backend, tmp_path):
    def build(path: Path) -> list[tuple[int, int]]:
        path.mkdir()
        with fresh_database(backend, path) as db_url:
            st = Store(db_url)
            try:
                return assign_twice(st)
            finally:
                st.close()

    def assign_twice(st: Store) -> list[tuple[int, int]]:
        admin, *_ = users(st, "admin:admin", "r1:reviewer", "r2:reviewer", "r3:reviewer", "r4:admin")
        ds = prompts_with_responses(st, admin["id"], n_prompts=9, per_prompt=1)
        assert sv.assign(st, ds, "rate", ["r1", "r2", "r3", "r4"], overlap=2) == 18
        with st.session(write=False) as s:
            rows = s.execute(select(Assignment.unit_id, Assignment.user_id).order_by(Assignment.id)).all()
        per_unit: dict[int, set[int]] = {}
        for unit, user in rows:
            per_unit.setdefault(unit, set()).add(user)
        assert len(per_unit) == 9 and all(len(u) == 2 for u in per_unit.values())  # overlap distinct users
        loads = [sum(1 for _, u in rows if u == uid) for uid in {u for _, u in rows}]
        assert sorted(loads) == [4, 4, 5, 5]  # balanced to within one
        assert sv.assign(st, ds, "rate", ["r1", "r2", "r3", "r4"], overlap=2) == 0  # nothing new
        assert sv.assign(st, ds, "rate", ["r1", "r2", "r3", "r4"], overlap=3) == 9  # one more user per unit
        with st.session(write=False) as s:
            n = s.scalar(select(Assignment.id).order_by(Assignment.id.desc()).limit(1))
        assert n == 27
        return [tuple(r) for r in rows]

    assert build(tmp_path / "a") == build(tmp_path / "b")  # deterministic


def test_assign_checks(store):
    admin, _, _ = users(store, "admin:admin", "rev:reviewer", "ann:annotator")
    ds = prompts_with_responses(store, admin["id"], n_prompts=2, per_prompt=1)
    cases = [
        (dict(kind="rate", usernames=["rev", "ann"], overlap=1), "usernames"),  # ann cannot rate
        (dict(kind="rate", usernames=["rev", "ghost"], overlap=1), "usernames"),
        (dict(kind="rate", usernames=["rev"], overlap=2), "overlap"),
        (dict(kind="rate", usernames=[], overlap=1), "usernames"),
        (dict(kind="review", usernames=["rev"], overlap=1), "kind"),
        (dict(kind="label", usernames=["ann"], overlap=1), "schema_id"),
        (dict(kind="rate", usernames=["rev"], overlap=1, schema_id=1), "schema_id"),
    ]
    for kwargs, field in cases:
        with pytest.raises(sv.Invalid) as e:
            sv.assign(store, ds, **kwargs)
        assert e.value.field == field, kwargs
    # ranking needs >= 2 responses per prompt; when no prompt has them the error names one
    with pytest.raises(sv.Invalid, match="prompt 1 has 1 response .and 1 more prompts.; ranking needs at least 2"):
        sv.assign(store, ds, "rank", ["rev"], 1)
    with pytest.raises(sv.NotFound):
        sv.assign(store, 999, "rate", ["rev"], 1)
    with store.session(write=False) as s:
        assert s.scalar(select(Assignment.id)) is None  # failed calls created nothing
    # prompts with fewer than 2 responses are left out until they have more
    sv.add_response(store, 1, "model-x", None, "another answer")
    assert sv.assign(store, ds, "rank", ["rev"], 1) == 1
    sv.add_response(store, 2, "model-x", None, "another answer")
    assert sv.assign(store, ds, "rank", ["rev"], 1) == 1  # now prompt 2; prompt 1 already has its user


def test_rate_flow_forbidden_conflict_invalid(store):
    admin, r1, r2 = users(store, "admin:admin", "r1:reviewer", "r2:reviewer")
    ds = prompts_with_responses(store, admin["id"], n_prompts=2, per_prompt=1)
    sv.assign(store, ds, "rate", ["r1", "r2"], 2)
    task = sv.next_assignment(store, r1["id"], "rate")
    assert set(task) == {"assignment_id", "kind", "dataset_id", "prompt", "response", "progress"}
    assert task["prompt"] == {"id": 1, "messages": [{"role": "user", "content": "question 0"}]}
    assert task["response"] == {"id": 1, "text": "answer 0 to prompt 1"}
    assert task["progress"] == {"done": 0, "total": 2}
    assert "model" not in json.dumps(task)  # blind: no model ids shown to reviewers
    aid = task["assignment_id"]

    with pytest.raises(sv.NotFound, match=f"no assignment with id {aid}$"):
        sv.submit_rating(store, r2["id"], aid, SCORES)
    for scores, field in [({**SCORES, "fluency": 6}, "fluency"), ({**SCORES, "coherence": 0}, "coherence"),
                          ({**SCORES, "relevance": True}, "relevance"), ({**SCORES, "relevance": "5"}, "relevance"),
                          ({k: v for k, v in SCORES.items() if k != "appropriateness"}, "appropriateness"),
                          ({**SCORES, "humour": 3}, "humour")]:
        with pytest.raises(sv.Invalid) as e:
            sv.submit_rating(store, r1["id"], aid, scores)
        assert e.value.field == field
    with pytest.raises(sv.Invalid) as e:
        sv.submit_rating(store, r1["id"], aid, SCORES, comment="x" * 20_000)
    assert e.value.field == "comment"
    with pytest.raises(sv.Invalid) as e:
        sv.submit_ranking(store, r1["id"], aid, [1])
    assert e.value.field == "assignment_id"  # a rate assignment, not a rank one
    with pytest.raises(sv.NotFound):
        sv.submit_rating(store, r1["id"], 999, SCORES)

    sv.submit_rating(store, r1["id"], aid, SCORES, comment="good")
    with pytest.raises(sv.Conflict):
        sv.submit_rating(store, r1["id"], aid, SCORES)
    nxt = sv.next_assignment(store, r1["id"], "rate")
    assert nxt["assignment_id"] != aid and nxt["progress"] == {"done": 1, "total": 2}
    sv.submit_rating(store, r1["id"], nxt["assignment_id"], SCORES)
    assert sv.next_assignment(store, r1["id"], "rate") is None
    assert sv.next_assignment(store, r1["id"], "rank") is None
    with store.session(write=False) as s:
        ratings = list(s.scalars(select(Rating).order_by(Rating.id)))
    assert len(ratings) == 2 and ratings[0].comment == "good" and ratings[0].fluency == 4
    assert {(p["username"], p["done"], p["total"]) for p in sv.progress(store)} == {("r1", 2, 2), ("r2", 0, 2)}


def test_rank_flow(store):
    admin, r1 = users(store, "admin:admin", "r1:reviewer")
    ds = prompts_with_responses(store, admin["id"], n_prompts=1, per_prompt=4)
    assert sv.assign(store, ds, "rank", ["r1"], 1) == 1
    task = sv.next_assignment(store, r1["id"], "rank")
    ids = [r["id"] for r in task["responses"]]
    assert sorted(ids) == [1, 2, 3, 4]
    assert sv.next_assignment(store, r1["id"], "rank")["responses"] == task["responses"]  # stable shuffle
    assert "model" not in json.dumps(task)
    for order in ([1, 2, 3], [1, 2, 3, 4, 99], [1, 1, 2, 3, 4], "1,2,3,4", [1, 2, 3, True]):
        with pytest.raises(sv.Invalid) as e:
            sv.submit_ranking(store, r1["id"], task["assignment_id"], order)
        assert e.value.field == "order"
    sv.submit_ranking(store, r1["id"], task["assignment_id"], [3, 1, 4, 2])
    with pytest.raises(sv.Conflict):
        sv.submit_ranking(store, r1["id"], task["assignment_id"], [3, 1, 4, 2])


def test_label_flow_and_agreement(store):
    admin, a1, a2, a3 = users(store, "admin:admin", "a1:annotator", "a2:annotator", "a3:annotator")
    texts = ["great service", "late again", "fine", "broken item", "ok", "love it"]
    ds = sv.import_dataset(store, "reviews", "items", [{"text": t} for t in texts], admin["id"])["id"]
    sid = sv.create_label_schema(store, "sent", [
        {"name": "sentiment", "type": "choice", "options": ["pos", "neg", "neu"], "required": True},
        {"name": "urgent", "type": "bool"}, {"name": "note", "type": "text"}])
    assert sv.assign(store, ds, "label", ["a1", "a2"], 2, schema_id=sid) == 12
    task = sv.next_assignment(store, a1["id"], "label")
    assert task["item"] == {"id": 1, "text": "great service"}
    assert task["schema"]["name"] == "sent" and len(task["schema"]["fields"]) == 3
    for value, field in [({"sentiment": "happy"}, "value.sentiment"), ({"urgent": True}, "value.sentiment"),
                         ({"sentiment": "pos", "urgent": "yes"}, "value.urgent"),
                         ({"sentiment": "pos", "colour": "red"}, "value.colour"), ("pos", "value")]:
        with pytest.raises(sv.Invalid) as e:
            sv.submit_label(store, a1["id"], task["assignment_id"], value)
        assert e.value.field == field
    with pytest.raises(sv.NotFound):
        sv.submit_label(store, a2["id"], task["assignment_id"], {"sentiment": "pos"})

    gold_a = ["pos", "neg", "neu", "neg", "neu", "pos"]
    gold_b = ["pos", "neg", "pos", "neg", "neu", "neu"]
    for user, gold in ((a1, gold_a), (a2, gold_b)):
        while (t := sv.next_assignment(store, user["id"], "label")) is not None:
            i = t["item"]["id"] - 1
            sv.submit_label(store, user["id"], t["assignment_id"], {"sentiment": gold[i], "urgent": i == 3})
    with pytest.raises(sv.Conflict):
        sv.submit_label(store, a1["id"], task["assignment_id"], {"sentiment": "pos"})
    agr = sv.agreement(store, ds)
    assert agr["n_units"] == {"rate": 0, "rank": 0, "label": 6}
    sent = agr["label"]["sentiment"]
    assert sent["cohen_kappa"] == pytest.approx(cohen_kappa(gold_a, gold_b))  # same two raters throughout
    assert sent["krippendorff_alpha"] == pytest.approx(krippendorff_alpha(list(zip(gold_a, gold_b)), "nominal"))
    assert "fleiss_kappa" not in sent and "note" not in agr["label"]  # free text is not scored
    assert agr["label"]["urgent"]["cohen_kappa"] == 1.0

    # a third annotator on every item: a fixed 3 raters per unit -> Fleiss' kappa
    assert sv.assign(store, ds, "label", ["a1", "a2", "a3"], 3, schema_id=sid) == 6
    gold_c = ["pos", "neg", "neu", "pos", "neu", "pos"]
    while (t := sv.next_assignment(store, a3["id"], "label")) is not None:
        sv.submit_label(store, a3["id"], t["assignment_id"], {"sentiment": gold_c[t["item"]["id"] - 1]})
    sent = sv.agreement(store, ds)["label"]["sentiment"]
    assert sent["fleiss_kappa"] == pytest.approx(fleiss_kappa(units=list(zip(gold_a, gold_b, gold_c))))
    assert "cohen_kappa" not in sent


def test_agreement_for_ratings_and_rankings(store):
    admin, r1, r2, r3 = users(store, "admin:admin", "r1:reviewer", "r2:reviewer", "r3:reviewer")
    ds = prompts_with_responses(store, admin["id"], n_prompts=3, per_prompt=2)
    empty = sv.agreement(store, ds)
    assert "rate" not in empty and "rank" not in empty and empty["n_units"]["rate"] == 0
    sv.assign(store, ds, "rate", ["r1"], 1)
    t = sv.next_assignment(store, r1["id"], "rate")
    sv.submit_rating(store, r1["id"], t["assignment_id"], SCORES)
    assert "rate" not in sv.agreement(store, ds)  # one rater per unit: nothing to agree on

    sv.assign(store, ds, "rate", ["r1", "r2"], 2)
    fluency = {}
    for user, bias in ((r1, 0), (r2, 1)):
        while (t := sv.next_assignment(store, user["id"], "rate")) is not None:
            f = min(5, 1 + t["response"]["id"] % 4 + bias * (t["response"]["id"] % 2))
            fluency.setdefault(t["response"]["id"], []).append(f)
            sv.submit_rating(store, user["id"], t["assignment_id"], {**SCORES, "fluency": f})
    agr = sv.agreement(store, ds)
    # r1's first rating (fluency 4) was submitted before the loop
    fluency[1].insert(0, 4)
    assert agr["n_units"]["rate"] == 6
    assert agr["rate"]["fluency"] == pytest.approx(krippendorff_alpha(list(fluency.values()), "interval"))
    assert agr["rate"]["relevance"] is None  # everyone said 5: no variation, alpha undefined

    sv.assign(store, ds, "rank", ["r1", "r2", "r3"], 3)
    for user in (r1, r2, r3):
        while (t := sv.next_assignment(store, user["id"], "rank")) is not None:
            ids = sorted(r["id"] for r in t["responses"])
            sv.submit_ranking(store, user["id"], t["assignment_id"], ids[::-1] if user is r3 else ids)
    rank = sv.agreement(store, ds)["rank"]
    # per prompt: r1 and r2 agree on the one pair, r3 disagrees with both -> 1 of 3 comparisons
    assert rank["pairwise_agreement"] == pytest.approx(1 / 3)
    assert 0.0 <= rank["kendall_w"] < 1.0


# --------------------------------------------------------------------------- concurrency


def test_concurrent_submissions_lose_nothing(url, store):
    """8 threads x 50 submissions on one SQLite file, through two Store objects (like two
    worker processes): every rating lands, none twice, and nobody sees 'database is locked'."""
    admin, *reviewers = users(store, "admin:admin", *(f"r{i}:reviewer" for i in range(8)))
    ds = prompts_with_responses(store, admin["id"], n_prompts=50, per_prompt=1)
    assert sv.assign(store, ds, "rate", [r["username"] for r in reviewers], overlap=8) == 400
    other = Store(url)
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []
    submitted = [0] * 8

    def work(i: int) -> None:
        st = store if i % 2 else other
        try:
            barrier.wait()
            while (t := sv.next_assignment(st, reviewers[i]["id"], "rate")) is not None:
                score = 1 + (t["response"]["id"] + i) % 5
                sv.submit_rating(st, reviewers[i]["id"], t["assignment_id"], {**SCORES, "fluency": score})
                submitted[i] += 1
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    other.close()
    assert not errors, errors[:3]
    assert submitted == [50] * 8
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ratings")).scalar() == 400
        assert conn.execute(text("SELECT count(DISTINCT assignment_id) FROM ratings")).scalar() == 400
        assert conn.execute(text("SELECT count(*) FROM assignments WHERE status = 'done'")).scalar() == 400
    assert sv.agreement(store, ds)["n_units"]["rate"] == 50


def test_simultaneous_messages_into_one_conversation(url, store):
    """10 rounds of 3 threads adding a question and its answer to one conversation at the same
    moment (a double click, two tabs), through two Store objects like two server processes: every
    message is stored, positions are 0..59 without a gap or a duplicate, each answer comes after its
    question, and nothing fails (on PostgreSQL two writers used to read the same max(position))."""
    (alice,) = users(store, "alice:reviewer")
    cid = sv.create_conversation(store, alice["id"], "m")
    other = Store(url)
    rounds, width = 10, 3
    errors: list[BaseException] = []
    pairs: list[tuple[int, int]] = []

    def send(st: Store, barrier: threading.Barrier, k: int) -> None:
        try:
            barrier.wait()
            question = sv.add_message(st, cid, "user", f"question {k}")
            answer = sv.add_message(st, cid, "assistant", f"answer {k}", parent_id=question, finish_reason="stop")
            pairs.append((question, answer))
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    for r in range(rounds):
        barrier = threading.Barrier(width)
        threads = [threading.Thread(target=send, args=(store if i % 2 else other, barrier, r * width + i))
                   for i in range(width)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert not any(t.is_alive() for t in threads), f"round {r}: a writer hung"
    other.close()
    assert not errors, errors[:3]
    msgs = sv.get_conversation(store, alice["id"], cid)["messages"]
    assert len(pairs) == rounds * width and len(msgs) == 2 * rounds * width
    with store.session(write=False) as s:
        positions = dict(s.execute(select(Message.id, Message.position).where(Message.conversation_id == cid)).all())
    assert sorted(positions.values()) == list(range(2 * rounds * width))
    assert all(positions[q] < positions[a] for q, a in pairs)
    assert [m["id"] for m in msgs] == sorted(positions, key=positions.get)  # read back in position order


def test_racing_double_submit_gives_one_row(store):
    admin, r1 = users(store, "admin:admin", "r1:reviewer")
    ds = prompts_with_responses(store, admin["id"], n_prompts=1, per_prompt=1)
    sv.assign(store, ds, "rate", ["r1"], 1)
    aid = sv.next_assignment(store, r1["id"], "rate")["assignment_id"]
    barrier = threading.Barrier(6)
    outcomes: list[str] = []

    def submit() -> None:
        barrier.wait()
        try:
            sv.submit_rating(store, r1["id"], aid, SCORES)
            outcomes.append("ok")
        except sv.Conflict:
            outcomes.append("conflict")
        except BaseException as e:  # noqa: BLE001
            outcomes.append(repr(e))

    threads = [threading.Thread(target=submit) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["conflict"] * 5 + ["ok"]
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM ratings")).scalar() == 1


# --------------------------------------------------------------------------- CLI


def run_cli(*argv: str) -> None:
    parser = argparse.ArgumentParser(prog="chatforge")
    add_feedback_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.func(args)


def test_cli_users_import_and_upgrade(tmp_path, capsys, monkeypatch):
    runs = tmp_path / "runs"
    where = ["--runs-dir", str(runs), "--run", "demo"]
    run_cli("feedback", "db", "upgrade", *where)
    assert "at revision 0002 (was empty)" in capsys.readouterr().out
    run_cli("feedback", "db", "upgrade", *where)
    assert "already up to date" in capsys.readouterr().out
    assert (runs / "demo" / "feedback.db").is_file()

    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hello"}\n\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ChatforgeError, match="no admin user"):
        run_cli("feedback", "import", "greetings", str(data), "--kind", "prompts", *where)
    run_cli("feedback", "users", "add", "boss", "--role", "admin", "--password", "s3cret", *where)
    monkeypatch.setenv("CHATFORGE_PASSWORD", "from-env")
    run_cli("feedback", "users", "add", "rita", "--role", "reviewer", *where)
    run_cli("feedback", "users", "list", *where)
    out = capsys.readouterr().out
    assert "created user 'boss'" in out and "rita" in out and "reviewer" in out
    url = default_db_url(runs / "demo")
    st = Store(url)
    assert sv.authenticate(st, "rita", "from-env")["role"] == "reviewer"
    run_cli("feedback", "users", "key", "rita", *where)
    key = capsys.readouterr().out.strip()
    assert sv.user_for_api_key(st, key)["username"] == "rita"
    with pytest.raises(ChatforgeError, match="no user 'nobody'"):
        run_cli("feedback", "users", "key", "nobody", *where)

    run_cli("feedback", "import", "greetings", str(data), "--kind", "prompts", *where)
    assert "imported 2 prompts into dataset 'greetings'" in capsys.readouterr().out
    bad = tmp_path / "items.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": ""}\n')
    with pytest.raises(ChatforgeError, match=r"items\.jsonl:2: text: must not be empty"):
        run_cli("feedback", "import", "things", str(bad), "--kind", "items", "--db", url)
    assert [d["name"] for d in sv.list_datasets(st)] == ["greetings"]
    st.close()


def test_cli_set_role_is_the_command_serve_names(tmp_path, capsys):
    from chatforge.serve.app import _ensure_admin

    runs = tmp_path / "runs"
    where = ["--runs-dir", str(runs), "--run", "demo"]
    run_cli("feedback", "users", "add", "admin", "--role", "reviewer", "--password", "pw-1", *where)
    st = Store(default_db_url(runs / "demo"))
    with pytest.raises(ChatforgeError, match="chatforge feedback users set-role admin admin") as e:
        _ensure_admin(st, "another-pw")  # `serve --admin-password` with a non-admin user called admin
    command = str(e.value).split("(", 1)[1].split(")", 1)[0].split()  # the command the message names
    assert command[:5] == ["chatforge", "feedback", "users", "set-role", "admin"]
    run_cli(*command[1:], *where)  # ... exists and does what it says
    assert "user 'admin' is now admin" in capsys.readouterr().out
    _ensure_admin(st, "another-pw")  # now satisfied: there is an admin
    assert [(u["username"], u["role"]) for u in sv.list_users(st)] == [("admin", "admin")]
    with pytest.raises(ChatforgeError, match="last admin"):
        run_cli("feedback", "users", "set-role", "admin", "reviewer", *where)
    with pytest.raises(ChatforgeError, match="no user named 'ghost'.*users list"):
        run_cli("feedback", "users", "set-role", "ghost", "admin", *where)
    st.close()


def test_cli_import_refuses_deeply_nested_rows_naming_the_line(tmp_path):
    where = ["--runs-dir", str(tmp_path / "runs"), "--run", "demo"]
    run_cli("feedback", "users", "add", "boss", "--role", "admin", "--password", "s3cret", *where)
    for depth in (33, 100_000):  # just past the limit, and past the parser's own recursion limit
        deep = tmp_path / "deep.jsonl"
        deep.write_text('{"text": "fine"}\n{"text": "x", "meta": ' + "[" * depth + "]" * depth + "}\n")
        with pytest.raises(ChatforgeError, match=r"deep\.jsonl:2: JSON nested more than 32 levels deep"):
            run_cli("feedback", "import", f"things{depth}", str(deep), "--kind", "items", *where)
