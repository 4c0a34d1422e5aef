"""Exporting feedback as training data: preference pairs, SFT, labels, ratings."""

from __future__ import annotations

import argparse
import json
from datetime import datetime
from pathlib import Path

import pytest

from chatforge.chat.data import load_chat_examples, messages_from_record
from chatforge.chat.template import render, validate_messages
from chatforge.data.records import iter_records
from chatforge.errors import ChatforgeError
from chatforge.store import Store
from chatforge.store import export as export_mod
from chatforge.store import service as sv
from chatforge.store.cli import add_feedback_parser
from chatforge.store.export import export_feedback
from chatforge.tokenizer.byte import ByteTokenizer

SYSTEM = {"role": "system", "content": "You are a support agent."}
QUESTION = {"role": "user", "content": "My parcel is late. What now?"}


@pytest.fixture
def store(tmp_path: Path) -> Store:
    s = Store(f"sqlite:///{tmp_path / 'fb.db'}")
    yield s
    s.close()


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def ranked_prompt(store: Store) -> dict:
    """One prompt with answers r0, r1, r2 from three models; 'rev' ranks them [r2, r0, r1]."""
    admin = sv.create_user(store, "admin", "pw", "admin")
    rev = sv.create_user(store, "rev", "pw", "reviewer")
    ds = sv.import_dataset(store, "support", "prompts", [{"messages": [SYSTEM, QUESTION]}], admin["id"])["id"]
    r = [sv.add_response(store, 1, f"model-{k}", f"v{k}", f"answer from model {k}") for k in range(3)]
    sv.assign(store, ds, "rank", ["rev"], 1)
    task = sv.next_assignment(store, rev["id"], "rank")
    sv.submit_ranking(store, rev["id"], task["assignment_id"], [r[2], r[0], r[1]])
    return {"admin": admin, "rev": rev, "dataset": ds, "r": r}


def test_ranking_gives_every_implied_pair(store, tmp_path):
    ctx = ranked_prompt(store)
    counts = export_feedback(store, tmp_path / "out", kinds=("preferences",))
    assert counts == {"preferences": 3}
    rows = read(tmp_path / "out" / "preferences.jsonl")
    pairs = [(row["chosen"][0]["content"][-1], row["rejected"][0]["content"][-1]) for row in rows]
    assert pairs == [("2", "0"), ("2", "1"), ("0", "1")]  # r2>r0, r2>r1, r0>r1
    first = rows[0]
    assert first["prompt"] == [SYSTEM, QUESTION]
    assert first["chosen"] == [{"role": "assistant", "content": "answer from model 2"}]
    assert first["rejected"] == [{"role": "assistant", "content": "answer from model 0"}]
    meta = first["meta"]
    assert meta["source"] == "ranking" and meta["user"] == "rev" and meta["dataset"] == "support"
    assert (meta["chosen_model"], meta["rejected_model"]) == ("model-2", "model-0")
    assert (meta["chosen_model_version"], meta["rejected_model_version"]) == ("v2", "v0")
    assert (meta["chosen_rank"], meta["rejected_rank"], meta["n_ranked"]) == (1, 2, 3)
    assert (meta["chosen_response_id"], meta["rejected_response_id"]) == (ctx["r"][2], ctx["r"][0])
    assert datetime.fromisoformat(meta["created_at"]).utcoffset().total_seconds() == 0
    assert rows[2]["meta"]["chosen_model"] == "model-0" and rows[2]["meta"]["rejected_rank"] == 3
    assert not (tmp_path / "out" / "sft.jsonl").exists()  # only the kinds asked for


def chat_with_thumbs(store: Store) -> dict:
    """A chat: answer A (thumbs down), regenerated B (thumbs up), a second turn answered by
    C (thumbs up) and D (no feedback)."""
    alice = sv.create_user(store, "alice", "pw", "reviewer")
    cid = sv.create_conversation(store, alice["id"], "run-sft", system=SYSTEM["content"])
    u1 = sv.add_message(store, cid, "user", QUESTION["content"])
    a = sv.add_message(store, cid, "assistant", "No idea.", model_id="run-sft", model_version="aaa")
    b = sv.add_message(store, cid, "assistant", "Let me check the tracking.", model_id="run-sft-v2",
                       model_version="bbb")
    u2 = sv.add_message(store, cid, "user", "Thanks!")
    c = sv.add_message(store, cid, "assistant", "You're welcome.", model_id="run-sft", model_version="aaa")
    d = sv.add_message(store, cid, "assistant", "Bye.", model_id="run-sft", model_version="aaa")
    sv.set_message_feedback(store, alice["id"], a, -1, "unhelpful")
    sv.set_message_feedback(store, alice["id"], b, 1, None)
    sv.set_message_feedback(store, alice["id"], c, 1, None)
    sv.set_message_feedback(store, alice["id"], d, 0, None)  # neutral: ignored
    return {"alice": alice, "cid": cid, "u1": u1, "u2": u2, "a": a, "b": b, "c": c, "d": d}


def test_thumbs_up_and_down_siblings_give_a_pair(store, tmp_path):
    ids = chat_with_thumbs(store)
    export_feedback(store, tmp_path, kinds=["preferences", "sft"])
    (pair,) = read(tmp_path / "preferences.jsonl")  # C has no thumbs-down sibling: no second pair
    assert pair["prompt"] == [SYSTEM, QUESTION]
    assert pair["chosen"] == [{"role": "assistant", "content": "Let me check the tracking."}]
    assert pair["rejected"] == [{"role": "assistant", "content": "No idea."}]
    meta = pair["meta"]
    assert meta["source"] == "thumbs" and meta["user"] == "alice"
    assert (meta["chosen_model"], meta["rejected_model"]) == ("run-sft-v2", "run-sft")
    assert (meta["chosen_message_id"], meta["rejected_message_id"]) == (ids["b"], ids["a"])
    assert meta["rejected_comment"] == "unhelpful"

    sft = read(tmp_path / "sft.jsonl")
    assert [r["meta"]["message_id"] for r in sft] == [ids["b"], ids["c"]]
    # the history follows parent links: the second turn continues after B, never the rejected A
    assert [m["content"] for m in sft[1]["messages"]] == [SYSTEM["content"], QUESTION["content"],
                                                           "Let me check the tracking.", "Thanks!", "You're welcome."]
    assert sft[1]["meta"]["source"] == "thumbs" and sft[1]["meta"]["model"] == "run-sft"


def rated_responses(store: Store) -> dict:
    ctx = ranked_prompt(store)
    r2 = sv.create_user(store, "rev2", "pw", "reviewer")
    sv.assign(store, ctx["dataset"], "rate", ["rev", "rev2"], 2)
    means = {ctx["r"][0]: 5, ctx["r"][1]: 3, ctx["r"][2]: 4}  # per-response score both raters give
    for user in (ctx["rev"], r2):
        while (t := sv.next_assignment(store, user["id"], "rate")) is not None:
            v = means[t["response"]["id"]]
            sv.submit_rating(store, user["id"], t["assignment_id"],
                             {"fluency": v, "coherence": v, "relevance": v, "appropriateness": v},
                             comment=f"{user['username']} says {v}")
    return ctx


def test_sft_from_high_ratings(store, tmp_path):
    ctx = rated_responses(store)
    assert export_feedback(store, tmp_path / "a", kinds=["sft"]) == {"sft": 2}  # means 5 and 4 pass 4.0
    rows = read(tmp_path / "a" / "sft.jsonl")
    assert [r["meta"]["response_id"] for r in rows] == [ctx["r"][0], ctx["r"][2]]
    assert rows[0]["messages"] == [SYSTEM, QUESTION, {"role": "assistant", "content": "answer from model 0"}]
    assert rows[0]["meta"] | {"created_at": None} == {
        "source": "ratings", "mean_rating": 5.0, "n_ratings": 2, "model": "model-0", "model_version": "v0",
        "dataset": "support", "prompt_id": 1, "response_id": ctx["r"][0], "created_at": None}
    assert export_feedback(store, tmp_path / "b", kinds=["sft"], min_rating=4.5) == {"sft": 1}
    assert export_feedback(store, tmp_path / "c", kinds=["sft"], min_rating=1) == {"sft": 3}

    # what `chatforge finetune sft` reads: every row renders as a training conversation
    examples, stats = load_chat_examples(tmp_path / "a" / "sft.jsonl", ByteTokenizer(), max_tokens=4096)
    assert stats.examples == 2 and all(ex.n_learned > 0 for ex in examples)


def test_ratings_export(store, tmp_path):
    rated_responses(store)
    assert export_feedback(store, tmp_path, kinds=["ratings"]) == {"ratings": 6}
    rows = read(tmp_path / "ratings.jsonl")
    assert set(rows[0]) == {"prompt", "response", "fluency", "coherence", "relevance", "appropriateness",
                            "comment", "meta"}
    assert rows[0]["prompt"] == [SYSTEM, QUESTION]
    assert {(r["meta"]["user"], r["meta"]["model"], r["fluency"]) for r in rows} == {
        (u, f"model-{k}", s) for u in ("rev", "rev2") for k, s in ((0, 5), (1, 3), (2, 4))}
    assert rows[0]["comment"] == f"{rows[0]['meta']['user']} says {rows[0]['fluency']}"


def test_unicode_line_breaks_in_text_keep_one_record_per_line(store, tmp_path):
    # A tiny model's sampled bytes can decode to U+0085/U+2028/U+2029: JSON leaves them raw, but
    # str.splitlines() (and many editors and tools) break lines there. The export escapes them.
    ctx = ranked_prompt(store)
    tricky = "line\u2028sep\x85next\u2029para \u00e9"
    sv.assign(store, ctx["dataset"], "rate", ["rev"], 1)
    while (t := sv.next_assignment(store, ctx["rev"]["id"], "rate")) is not None:
        sv.submit_rating(store, ctx["rev"]["id"], t["assignment_id"],
                         {"fluency": 4, "coherence": 4, "relevance": 4, "appropriateness": 4}, comment=tricky)
    assert export_feedback(store, tmp_path, kinds=["ratings"]) == {"ratings": 3}
    text = (tmp_path / "ratings.jsonl").read_text(encoding="utf-8")
    assert "\u2028" not in text and "\x85" not in text and "\u2029" not in text and "\u00e9" in text
    rows = [json.loads(line) for line in text.splitlines()]
    assert len(rows) == 3 and {r["comment"] for r in rows} == {tricky}


def test_labels_export(store, tmp_path):
    admin = sv.create_user(store, "admin", "pw", "admin")
    ann = sv.create_user(store, "ann", "pw", "annotator")
    ds = sv.import_dataset(store, "tickets", "items", [{"text": "refund please", "meta": {"ticket": 7}},
                                                       {"text": "where is it"}], admin["id"])["id"]
    one = sv.create_label_schema(store, "intent", [{"name": "intent", "type": "choice",
                                                    "options": ["refund", "tracking"], "required": True}])
    two = sv.create_label_schema(store, "triage", [{"name": "urgent", "type": "bool", "required": True},
                                                   {"name": "note", "type": "text"}])
    sv.assign(store, ds, "label", ["ann"], 1, schema_id=one)
    for intent in ("refund", "tracking"):
        t = sv.next_assignment(store, ann["id"], "label")
        sv.submit_label(store, ann["id"], t["assignment_id"], {"intent": intent})
    ds2 = sv.import_dataset(store, "more", "items", [{"text": "asap!!"}], admin["id"])["id"]
    sv.assign(store, ds2, "label", ["ann"], 1, schema_id=two)
    t = sv.next_assignment(store, ann["id"], "label")
    sv.submit_label(store, ann["id"], t["assignment_id"], {"urgent": True})

    assert export_feedback(store, tmp_path, kinds=["labels"]) == {"labels": 3}
    rows = read(tmp_path / "labels.jsonl")
    assert [(r["text"], r["label"]) for r in rows] == [
        ("refund please", "refund"), ("where is it", "tracking"),
        ("asap!!", {"urgent": True, "note": None})]  # several fields: the whole value
    assert rows[0]["meta"]["item_meta"] == {"ticket": 7} and rows[0]["meta"]["schema"] == "intent"
    assert rows[0]["meta"]["user"] == "ann" and rows[0]["meta"]["dataset"] == "tickets"
    for where, record in iter_records(tmp_path / "labels.jsonl"):  # chatforge's record reader
        assert isinstance(record["text"], str), where


def test_exports_load_with_chatforge_readers(store, tmp_path):
    rated_responses(store)
    chat_with_thumbs(store)
    counts = export_feedback(store, tmp_path)
    assert counts == {"preferences": 4, "sft": 4, "labels": 0, "ratings": 6}
    assert (tmp_path / "labels.jsonl").read_text() == ""
    tok = ByteTokenizer()
    records = list(iter_records(tmp_path / "preferences.jsonl"))
    assert len(records) == 4
    for where, rec in records:
        for side in ("chosen", "rejected"):
            # TRL's conversational prompt/completion form, as chatforge's chat reader joins it
            messages = messages_from_record({"prompt": rec["prompt"], "completion": rec[side]}, where)
            validate_messages(messages, where, require_assistant=True)
            assert render(messages, tok, require_assistant=True, where=where).n_learned > 0
    examples, stats = load_chat_examples(tmp_path / "sft.jsonl", tok, max_tokens=4096)
    assert stats.examples == 4


def test_export_is_atomic_and_validates(store, tmp_path, monkeypatch):
    ranked_prompt(store)
    out = tmp_path / "out"
    export_feedback(store, out, kinds=["preferences"])
    before = (out / "preferences.jsonl").read_text()

    def broken(s, min_rating):
        yield {"prompt": [], "chosen": [], "rejected": [], "meta": {}}
        raise RuntimeError("disk on fire")

    monkeypatch.setitem(export_mod._BUILDERS, "preferences", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        export_feedback(store, out, kinds=["preferences"])
    assert (out / "preferences.jsonl").read_text() == before  # the previous export is intact
    assert sorted(p.name for p in out.iterdir()) == ["preferences.jsonl"]  # no temp file left behind

    with pytest.raises(sv.Invalid) as e:
        export_feedback(store, out, kinds=["preferences", "dpo"])
    assert e.value.field == "kinds" and "dpo" in str(e.value)
    with pytest.raises(sv.Invalid) as e:
        export_feedback(store, out, min_rating=9)
    assert e.value.field == "min_rating"


def test_cli_export(store, tmp_path, capsys):
    ranked_prompt(store)
    parser = argparse.ArgumentParser(prog="chatforge")
    add_feedback_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["feedback", "export", "--db", store.url, "--out", str(tmp_path / "x"),
                              "--kind", "preferences", "--kind", "ratings"])
    args.func(args)
    out = capsys.readouterr().out
    assert "preferences.jsonl: 3 rows" in out and "ratings.jsonl: 0 rows" in out
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["preferences.jsonl", "ratings.jsonl"]
    with pytest.raises(SystemExit):  # argparse rejects unknown kinds before anything runs
        parser.parse_args(["feedback", "export", "--out", "x", "--kind", "dpo"])
    bad = parser.parse_args(["feedback", "export", "--db", "nonsense", "--out", str(tmp_path / "y")])
    with pytest.raises(ChatforgeError, match="not a valid SQLAlchemy URL"):
        bad.func(bad)
