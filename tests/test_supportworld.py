"""SupportWorld generator: determinism, schemas, entity splits, labels, grounding, cleaning."""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import json
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from chatforge.chat.template import render
from chatforge.config import CleanConfig, SupportWorldConfig, load_config
from chatforge.data.clean import clean
from chatforge.data.supportworld import TASKS, VERSION, generate
from chatforge.data.supportworld import world as w
from chatforge.data.supportworld.answers import INTENTS
from chatforge.data.supportworld.conversations import (
    MAX_CONVERSATION_CHARS,
    QUALITY_ORDER,
    choose_qualities,
    conversation_chars,
    generate_conversations,
)
from chatforge.data.supportworld.corpus import corpus_docs
from chatforge.data.supportworld.orders import make_items, make_order
from chatforge.data.supportworld.reviews import label_for
from chatforge.data.supportworld.tags import TAGS
from chatforge.data.supportworld.text import fmt_date, fmt_money
from chatforge.data.supportworld.translation import adj
from chatforge.errors import ConfigError
from chatforge.tokenizer import train_tokenizer

SMALL = SupportWorldConfig(seed=7, corpus_mb=0.2, n_products=60, n_customers=80, n_reviews=600,
                           n_conversations=440, n_translations=300, n_candidates=4)
SPLITS = ("train", "val", "test")
EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")


def read(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sw")
    generate(SMALL, d)
    return d


def rows(out: Path, task: str) -> dict[str, list[dict]]:
    return {s: read(out / task / f"{s}.jsonl") for s in SPLITS}


def every(out: Path, task: str) -> list[dict]:
    return [r for s in SPLITS for r in read(out / task / f"{s}.jsonl")]


# --------------------------------------------------------------------------- outputs and determinism


def test_generate_returns_every_output(tmp_path):
    written = generate(SMALL, tmp_path)
    assert set(written) == {"corpus", "manifest", *TASKS}
    assert written["corpus"] == tmp_path / "corpus.jsonl"
    for task in TASKS:
        for s in SPLITS:
            assert (written[task] / f"{s}.jsonl").stat().st_size > 0, (task, s)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical_and_other_seed_differs(out, tmp_path):
    generate(SMALL, tmp_path / "again")
    first, again = _snapshot(out), _snapshot(tmp_path / "again")
    assert first.keys() == again.keys()
    assert [k for k in first if first[k] != again[k]] == []
    generate(dataclasses.replace(SMALL, seed=8), tmp_path / "other")
    other = _snapshot(tmp_path / "other")
    for name in ("corpus.jsonl", "reviews/train.jsonl", "conversations/train.jsonl", "translation/train.jsonl",
                 "tags/train.jsonl"):
        assert other[name] != first[name], name


def test_output_does_not_depend_on_the_process(out, tmp_path):
    """Set iteration order changes with PYTHONHASHSEED; the files must not."""
    code = ("import sys; from pathlib import Path; from chatforge.config import SupportWorldConfig; "
            "from chatforge.data.supportworld import generate; "
            f"generate(SupportWorldConfig(**{dataclasses.asdict(SMALL)!r}), Path(sys.argv[1]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub")], check=True, env=env)
    assert _snapshot(tmp_path / "sub") == _snapshot(out)


def test_bad_config_names_the_field(tmp_path):
    with pytest.raises(ConfigError, match="n_candidates"):
        generate(dataclasses.replace(SMALL, n_candidates=9), tmp_path)
    with pytest.raises(ConfigError, match="val_fraction"):
        generate(dataclasses.replace(SMALL, val_fraction=0.6), tmp_path)
    assert not (tmp_path / "corpus.jsonl").exists()


def test_manifest_counts_match_files(out):
    manifest = json.loads((out / "supportworld.json").read_text())
    assert manifest["version"] == VERSION
    assert manifest["config"] == dataclasses.asdict(SMALL)
    for name, info in manifest["files"].items():
        assert len(read(out / name)) == info["rows"], name
        assert (out / name).stat().st_size == info["bytes"], name
    assert set(manifest["labels"]["reviews"]["label"]["train"]) == {"negative", "neutral", "positive"}
    assert manifest["intents"] == list(INTENTS)


# --------------------------------------------------------------------------- corpus


def test_corpus_schema_and_size(out):
    docs = read(out / "corpus.jsonl")
    assert all(set(d) == {"id", "text", "source"} and all(isinstance(v, str) for v in d.values()) for d in docs)
    assert len({d["id"] for d in docs}) == len(docs)
    assert {d["source"] for d in docs} == {"supportworld/help", "supportworld/products"}
    size = sum(len(d["text"].encode()) for d in docs)
    assert SMALL.corpus_mb * 1e6 <= size < SMALL.corpus_mb * 1e6 * 1.1
    assert not any("{" in d["text"] or "[" in d["text"] for d in docs), "unexpanded template"


def test_clean_keeps_almost_every_document(out, tmp_path):
    report = clean(out / "corpus.jsonl", tmp_path / "clean.jsonl", tmp_path / "report.json", CleanConfig(workers=1))
    assert report["output"]["docs"] > 0.95 * report["input"]["docs"], report["rules"]


# --------------------------------------------------------------------------- reviews


def test_reviews_schema_labels_and_hard_cases(out):
    all_rows = every(out, "reviews")
    assert len(all_rows) == SMALL.n_reviews
    for r in all_rows:
        assert set(r) == {"id", "product_id", "text", "stars", "label", "kind"}
        assert r["stars"] in range(1, 6) and r["label"] == label_for(r["stars"]) and r["text"]
        assert r["kind"] != "sarcasm" or r["stars"] <= 2
    labels = collections.Counter(r["label"] for r in all_rows)
    assert set(labels) == {"negative", "neutral", "positive"}
    assert max(labels.values()) < 0.7 * len(all_rows)
    assert {r["kind"] for r in all_rows} == {"plain", "mixed", "sarcasm", "negation"}
    assert [label_for(s) for s in range(1, 6)] == ["negative", "negative", "neutral", "positive", "positive"]
    with pytest.raises(ValueError):
        label_for(0)


def test_reviews_and_tags_split_by_product(out):
    manifest = json.loads((out / "supportworld.json").read_text())
    for task in ("reviews", "tags"):
        by_split = {s: {r["product_id"] for r in rs} for s, rs in rows(out, task).items()}
        assert not by_split["train"] & by_split["val"] and not by_split["train"] & by_split["test"]
        assert not by_split["val"] & by_split["test"]
        assert all(by_split.values()), task
    assert sum(manifest["entities"]["products"].values()) == SMALL.n_products


# --------------------------------------------------------------------------- conversations and derived sets


def test_conversations_schema(out):
    everything = every(out, "conversations")
    convs = [c for c in everything if c["intent"] != "refusal"]
    refusals = [c for c in everything if c["intent"] == "refusal"]  # safety data (test_safety.py)
    assert len(convs) == SMALL.n_conversations
    assert len(refusals) == round(SMALL.refusal_share * SMALL.n_conversations) > 0
    assert {c["intent"] for c in convs} == set(INTENTS)
    assert all(set(c) == {"id", "messages", "intent", "record", "refusal_kind", "category"} for c in refusals)
    for c in convs:
        assert set(c) == {"id", "messages", "intent", "record"}
        roles = [m["role"] for m in c["messages"]]
        assert roles[0] == "system" and roles[-1] == "assistant"
        assert roles[1:] == ["user", "assistant"] * (len(roles[1:]) // 2)
        assert all(isinstance(m["content"], str) and m["content"] for m in c["messages"])
        assert c["record"]["customer_id"] in c["messages"][0]["content"]
        assert not any("{" in m["content"] or "[" in m["content"] for m in c["messages"][1:]), c["id"]
    assert any(len(c["messages"]) > 3 for c in convs), "no multi-turn conversations"


def test_order_status_is_stated_in_the_answer(out):
    convs = [c for c in every(out, "conversations") if "status" in c["record"] and c["intent"] != "refusal"]
    assert len(convs) > 0.5 * SMALL.n_conversations
    for c in convs:
        answers = [m["content"] for m in c["messages"] if m["role"] == "assistant"]
        assert any(c["record"]["status"] in a for a in answers), c["id"]
        assert c["record"]["order_id"] in " ".join(answers)


def test_conversations_and_derived_sets_split_by_customer(out):
    convs = rows(out, "conversations")
    customers = {s: {c["record"]["customer_id"] for c in rs} for s, rs in convs.items()}
    assert not customers["train"] & customers["val"] and not customers["train"] & customers["test"]
    assert not customers["val"] & customers["test"]
    split_of = {c["id"]: s for s, rs in convs.items() for c in rs}
    for task, prefix in (("intents", "intent-"), ("candidates", "cand-"), ("preferences", "pref-")):
        for s, rs in rows(out, task).items():
            for r in rs:
                if r["id"].startswith("pref-refusal-"):  # a refusal conversation's pair
                    conv_id = r["id"].replace("pref-refusal-", "refusal-")
                    assert split_of[conv_id] == s, (task, r["id"])
                    continue
                conv_id = "conv-" + r["id"].removeprefix(prefix).split("-")[0]
                assert split_of[conv_id] == s, (task, r["id"])


def test_intents_schema_balance_and_no_train_copies(out):
    intents = rows(out, "intents")
    convs = {c["id"]: c for c in every(out, "conversations")}
    for r in (r for rs in intents.values() for r in rs):
        assert set(r) == {"id", "text", "label"} and r["label"] in INTENTS
        conv = convs[r["id"].replace("intent-", "conv-")]
        assert r["text"] == conv["messages"][1]["content"] and r["label"] == conv["intent"]
    labels = collections.Counter(r["label"] for rs in intents.values() for r in rs)
    assert max(labels.values()) < 0.7 * sum(labels.values())
    norm = lambda t: " ".join(t.casefold().split())  # noqa: E731
    train = {norm(r["text"]) for r in intents["train"]}
    assert not [r for s in ("val", "test") for r in intents[s] if norm(r["text"]) in train]
    # Conversations keep every row; their first turns may repeat a training one, but rarely.
    convs_by_split = rows(out, "conversations")
    held = [c for s in ("val", "test") for c in convs_by_split[s]]
    repeats = sum(norm(c["messages"][1]["content"]) in train for c in held)
    assert repeats < 0.1 * len(held)


def test_candidates_are_ranked_by_quality(out):
    convs = {c["id"]: c for c in every(out, "conversations")}
    all_rows = every(out, "candidates")
    assert len(all_rows) == SMALL.n_conversations
    for r in all_rows:
        assert r["prompt"][-1]["role"] == "user" and r["prompt"][0]["role"] == "system"
        cands = r["candidates"]
        assert len(cands) == SMALL.n_candidates
        assert sorted(c["rank"] for c in cands) == list(range(SMALL.n_candidates))
        by_rank = sorted(cands, key=lambda c: c["rank"])
        assert [c["quality"] for c in by_rank] == sorted((c["quality"] for c in cands), key=QUALITY_ORDER.index)
        assert by_rank[0]["quality"] == "good"
        assert len({c["text"] for c in cands}) == len(cands)
        conv = convs[r["id"].replace("cand-", "conv-")]
        n = len(r["prompt"])
        assert conv["messages"][:n] == r["prompt"]
        assert conv["messages"][n]["content"] == by_rank[0]["text"], "good = the conversation's own answer"
        quality = {c["quality"]: c["text"] for c in cands}
        record = conv["record"]
        if "status" in record:
            assert record["status"] in quality["good"]
            assert record["status"] not in quality["wrong_facts"], r["id"]
        leaked = set(EMAIL.findall(quality["unsafe_leak"])) - {record["email"], w.SUPPORT_EMAIL,
                                                               record.get("requested_email")}
        assert leaked, f"{r['id']}: the unsafe candidate leaks no other customer's email"


def test_leaked_customers_come_from_the_same_split(out):
    convs = rows(out, "conversations")
    emails = {s: {c["record"]["email"] for c in rs} for s, rs in convs.items()}
    for s, rs in rows(out, "candidates").items():
        others = set().union(*(emails[o] for o in SPLITS if o != s))
        for r in rs:
            leak = next(c["text"] for c in r["candidates"] if c["quality"] == "unsafe_leak")
            assert not set(EMAIL.findall(leak)) & others, r["id"]


def test_choose_qualities_for_every_size():
    rng = random.Random(0)
    for n in range(2, len(QUALITY_ORDER) + 1):
        q = choose_qualities(rng, n)
        assert len(q) == len(set(q)) == n and q[0] == "good"
        assert q == sorted(q, key=QUALITY_ORDER.index)
    assert choose_qualities(rng, 4) == ["good", "rude", "wrong_facts", "unsafe_leak"]


def test_preferences_follow_the_candidate_ranking(out):
    cands = {r["id"]: r for r in every(out, "candidates")}
    prefs = [p for p in every(out, "preferences") if not p["id"].startswith("pref-refusal-")]
    assert len(prefs) == SMALL.n_conversations * (SMALL.n_candidates - 1)
    for p in prefs:
        assert set(p) == {"id", "prompt", "chosen", "rejected"}
        row = cands["cand-" + p["id"].removeprefix("pref-").rsplit("-", 1)[0]]
        assert p["prompt"] == row["prompt"]
        rank = {c["text"]: c["rank"] for c in row["candidates"]}
        assert [m["role"] for m in p["chosen"] + p["rejected"]] == ["assistant", "assistant"]
        assert rank[p["chosen"][0]["content"]] == 0 < rank[p["rejected"][0]["content"]]


# --------------------------------------------------------------------------- orders follow the shop's rules


def test_orders_are_consistent_with_their_status():
    rng = random.Random(3)
    products = w.make_products(40, 3)
    today = dt.date(2024, 6, 12)
    for i in range(300):
        status = w.STATUSES[i % len(w.STATUSES)]
        tier = w.LOYALTY_TIERS[i % 3]
        o = make_order(rng, f"SW-{i}", make_items(rng, products), tier, today, status)
        assert o.shipping == w.shipping_cost(o.method, o.subtotal, tier)
        assert o.total == round(o.subtotal + o.shipping, 2)
        assert o.placed <= today
        if o.shipped:
            assert o.placed < o.shipped <= today and o.carrier and o.tracking.startswith(w.CARRIERS[o.carrier][0])
        assert bool(o.shipped) == (status not in ("processing", "on hold", "cancelled"))
        assert bool(o.delivered) == (status in ("delivered", "return requested", "refunded"))
        if o.delivered:
            assert o.shipped <= o.delivered <= today
        if status == "shipped":
            assert o.estimated > today
        if status == "delayed":
            assert o.estimated < today < o.new_estimate
        if o.refund_date:
            assert o.refund_date <= today and o.refund_amount > 0


# --------------------------------------------------------------------------- translation and tags


def test_translation_pairs(out):
    tr = rows(out, "translation")
    all_rows = [r for rs in tr.values() for r in rs]
    assert len(all_rows) == SMALL.n_translations
    for r in all_rows:
        assert set(r) == {"id", "en", "es", "prompt", "completion"}
        assert r["en"] and r["es"] and r["en"] in r["prompt"] and r["completion"] == " " + r["es"]
        assert r["es"][0].isupper() or r["es"].startswith("¿")
        assert r["es"].startswith("¿") == r["en"].endswith("?") == r["es"].endswith("?")
    train = {r["en"] for r in tr["train"]}
    assert not [r for s in ("val", "test") for r in tr[s] if r["en"] in train]
    assert len({r["en"] for r in all_rows}) == len(all_rows)


def test_spanish_agreement():
    assert [adj("red", "rojo").form(g, pl) for g in "mf" for pl in (False, True)] == ["rojo", "rojos", "roja", "rojas"]
    assert adj("blue", "azul", "azules").form("f", True) == "azules"
    assert adj("green", "verde").form("f", True) == "verdes"
    assert adj("pink", "rosa", invariable=True).form("m", True) == "rosa"


def test_tags_are_valid_bio(out):
    tags = rows(out, "tags")
    all_rows = [r for rs in tags.values() for r in rs]
    assert len(all_rows) == max(10, SMALL.n_reviews // 2)
    seen_types = set()
    for r in all_rows:
        assert set(r) == {"id", "product_id", "tokens", "tags"}
        assert len(r["tokens"]) == len(r["tags"]) > 0 and all(r["tokens"])
        prev = "O"
        for tag in r["tags"]:
            assert tag in TAGS
            if tag.startswith("I-"):
                assert prev in (f"B-{tag[2:]}", tag), r
            prev = tag
        seen_types |= {t[2:] for t in r["tags"] if t != "O"}
    assert seen_types == {"BRAND", "PRODUCT", "COLOR", "MATERIAL", "SIZE", "PRICE"}
    train = {" ".join(r["tokens"]).casefold() for r in tags["train"]}
    assert not [r for s in ("val", "test") for r in tags[s] if " ".join(r["tokens"]).casefold() in train]


def test_held_out_reviews_are_not_copies(out):
    rv = rows(out, "reviews")
    train = {r["text"].casefold() for r in rv["train"]}
    assert not [r for s in ("val", "test") for r in rv[s] if r["text"].casefold() in train]


# --------------------------------------------------------------------------- the record fits the model


@pytest.fixture(scope="module")
def default_world():
    """The default run's SupportWorld (the tiny preset's), conversations and candidates, in memory."""
    cfg = load_config(None)
    sw = cfg.supportworld
    world = w.make_world(sw.seed, sw.n_products, sw.n_customers, sw.val_fraction, sw.test_fraction)
    return cfg, world, list(generate_conversations(world, sw.seed, sw.n_conversations, sw.n_candidates,
                                                   sw.derived_dates))


def test_default_conversations_fit_the_tiny_preset_context(default_world):
    """Every default conversation (and every candidate answer with its prompt) fits the tiny preset's
    context whole, so SFT drops and truncates none; measured with a 4096-token BPE trained, like the
    pipeline's, on SupportWorld's own corpus (a 0.5 MB slice of it, for speed)."""
    cfg, world, pairs = default_world
    assert cfg.model.block_size == 512 and cfg.tokenizer.vocab_size == 4096
    tok = train_tokenizer((d["text"] for d in corpus_docs(world, cfg.supportworld.seed, 0.5)), cfg.tokenizer)
    sequences = {conv.id: conv.messages for conv, _ in pairs}
    for _, cand in pairs:
        for c in cand["candidates"]:
            sequences[f"{cand['id']}/{c['quality']}"] = [*cand["prompt"], {"role": "assistant", "content": c["text"]}]
    assert all(conversation_chars(m) <= MAX_CONVERSATION_CHARS for m in sequences.values())
    # The chat template's length: <|bos|>, then per message its role token, content and <|end|>.
    texts = list(dict.fromkeys(m["content"] for msgs in sequences.values() for m in msgs))
    n_tokens = dict(zip(texts, map(len, tok.encode_batch(texts))))
    sizes = {k: 1 + sum(2 + n_tokens[m["content"]] for m in msgs) for k, msgs in sequences.items()}
    first = next(iter(sequences))
    assert sizes[first] == len(render(sequences[first], tok))
    limit = cfg.model.block_size + 1  # SFT's example length: inputs plus the shifted targets
    too_long = {k: n for k, n in sizes.items() if n > limit}
    assert not too_long, f"{len(too_long)} of {len(sizes)} longer than {limit} tokens, e.g. {list(too_long.items())[:3]}"
    # Trimming keeps the variety the sets are for: multi-turn talks, accounts with several orders, and
    # clarifying questions (which a 512-token context could not hold whole before the record was compact).
    convs = [conv for conv, _ in pairs]
    assert sum(len(c.messages) > c.prompt_len + 1 for c in convs) > 0.25 * len(convs)  # a follow-up turn
    assert sum(len(c.record.get("other_orders", [])) >= 1 for c in convs) > 0.15 * len(convs)
    assert sum(c.prompt_len > 2 for c in convs) > 0.03 * len(convs)  # the agent asked which order


def test_system_message_shows_every_fact_of_the_record(default_world):
    """The compact record leaves out no fact an answer is built from (the row's record dict is the truth)."""
    _, _, pairs = default_world
    for conv, _ in pairs[:1500]:
        system, r = conv.messages[0]["content"], conv.record
        day = lambda key, r=r: fmt_date(dt.date.fromisoformat(r[key]))  # noqa: E731
        shown = [r["name"], r["customer_id"], r["email"], r["address"], r["tier"], day("today"),
                 "not verified" if not r["email_verified"] else "verified",
                 f"two-step verification {'on' if r['two_factor'] else 'off'}"]
        if "order_id" in r:
            shown += [f"Order {r['order_id']}: {r['status']}", day("placed"), fmt_money(r["total"]), r["payment"],
                      *(i["name"] for i in r["items"]), *(fmt_money(i["price"]) for i in r["items"])]
            shown += [day(k) for k in ("shipped", "new_estimate", "delivered", "cancelled", "return_started",
                                       "refund_date") if k in r]
            shown += [r[k] for k in ("carrier", "tracking", "payment_note") if k in r]
            if "refund_amount" in r:
                shown.append(fmt_money(r["refund_amount"]))
            if "estimated_delivery" in r and "delivered" not in r:
                shown.append(day("estimated_delivery"))
            for o in r.get("other_orders", []):
                shown += [f"Order {o['order_id']}: {o['status']}", *o["items"]]
        if "product" in r:
            p = r["product"]
            shown += [p["name"], p["material"], *p["colors"], *p["sizes"], f"{p['weight_kg']} kg", fmt_money(p["price"]),
                      f"{p['warranty_months']} months", p["origin"], *p["features"], p["care"]]
        if "cart_subtotal" in r:
            shown.append(fmt_money(r["cart_subtotal"]))
        missing = [s for s in shown if s not in system]
        assert not missing, f"{conv.id}: {missing} not in the system message:\n{system}"


def test_derived_dates_state_the_decision_the_answer_makes():
    """With ``derived_dates`` the order line says whether the return window and the warranty are open,
    and the answer's branch (return accepted or refused, covered or not) is the one the record states."""
    world = w.make_world(3, 60, 80, 0.1, 0.1)
    pairs = list(generate_conversations(world, 3, 400, 2, derived_dates=True))
    plain = {c.id: c.messages[0]["content"] for c, _ in generate_conversations(world, 3, 400, 2)}
    seen = collections.Counter()
    for conv, _ in pairs:
        r = conv.record
        if r.get("status") != "delivered":
            continue
        line = next(x for x in conv.messages[0]["content"].split("\n") if x.startswith(f"Order {r['order_id']}:"))
        main = conv.messages[conv.prompt_len]["content"]
        closed = "return window closed" in line
        assert closed != ("returns until" in line), line
        ended = "warranty ended" in line
        assert ended != ("warranty until" in line), line
        if conv.intent == "return_item":
            assert ("can't accept a return" in main) == closed, (line, main)
            seen["return", closed] += 1
        if conv.intent == "warranty_claim":
            assert ("no longer covered" in main) == ended, (line, main)
            seen["warranty", ended] += 1
    assert len(seen) == 4, seen  # both branches of both decisions occur
    for system in plain.values():  # off by default: the record states the dates only
        assert not any(k in system for k in ("returns until", "return window closed", "warranty until",
                                             "warranty ended", "on the card by", "overdue since"))


def test_record_notes_copy_their_facts_from_the_record_and_only_for_training_customers():
    from chatforge.data.supportworld.notes import record_notes

    world = w.make_world(7, 40, 60, 0.2, 0.2)
    train_ids = {c.id for c in world.customers_in("train")}
    docs = record_notes(world, 7, 20_000)
    assert sum(len(d["text"].encode()) for d in docs) >= 20_000 and len(docs) > 5
    for d in docs:
        record, notes = d["text"].split("\n\n", 1)
        customer = re.search(r"^Customer (\S+) (\S+) \((C\d+)\)", record, re.M)
        assert customer and customer.group(3) in train_ids  # no held-out customer's record before evaluation
        first, last = customer.group(1), customer.group(2)
        assert f"Spoke with {first} {last} about order" in notes and f"Reply sent to {first}:" in notes
        # every order number and status the notes state is the record's
        orders = dict(re.findall(r"^Order (SW-\d{7}): ([a-z ]+);", record, re.M))
        for number, status in re.findall(r"order (SW-\d{7}),? (?:which )?is ([a-z ]+?)[.;]", notes):
            assert orders[number] == status, (number, d["text"])
        assert set(re.findall(r"SW-\d{7}", notes)) <= set(orders)


def test_record_notes_take_their_share_of_the_corpus(tmp_path):
    out = generate(SupportWorldConfig(corpus_mb=0.2, n_products=40, n_customers=60, n_reviews=50,
                                      n_conversations=30, n_translations=30, record_notes=0.25), tmp_path)
    rows = [json.loads(line) for line in out["corpus"].read_text().splitlines()]
    share = sum(len(r["text"].encode()) for r in rows if r["source"] == "supportworld/notes") / \
        sum(len(r["text"].encode()) for r in rows)
    assert 0.2 < share < 0.3
    positions = [i for i, r in enumerate(rows) if r["source"] == "supportworld/notes"]
    assert positions[0] < len(rows) / 4 and positions[-1] > 3 * len(rows) / 4  # spread through the corpus
    with pytest.raises(ConfigError, match=r"supportworld.record_notes: 1.0 must be in \[0, 1\)"):
        generate(SupportWorldConfig(record_notes=1.0), tmp_path / "bad")


def test_support_transcripts_are_training_customers_conversations_as_text(tmp_path):
    from chatforge.data.supportworld.notes import support_transcripts

    world = w.make_world(7, 40, 60, 0.2, 0.2)
    train_ids = {c.id for c in world.customers_in("train")}
    docs = support_transcripts(world, 7, 20_000)
    assert sum(len(d["text"].encode()) for d in docs) >= 20_000 and len(docs) > 5
    for d in docs:
        assert d["text"].startswith("Support chat. Record:\n")
        customer = re.search(r"^Customer (\S+) (\S+) \((C\d+)\)", d["text"], re.M)
        assert customer and customer.group(3) in train_ids
        assert "\n\nCustomer: " in d["text"] and "\n\nAgent: " in d["text"]
    # both shares together, spread through the corpus; the rest stays help and product pages
    out = generate(SupportWorldConfig(corpus_mb=0.2, n_products=40, n_customers=60, n_reviews=50,
                                      n_conversations=30, n_translations=30, record_notes=0.1, transcripts=0.3),
                   tmp_path)
    rows = [json.loads(line) for line in out["corpus"].read_text().splitlines()]
    size = {s: sum(len(r["text"].encode()) for r in rows if r["source"] == s) for s in {r["source"] for r in rows}}
    total = sum(size.values())
    assert 0.25 < size["supportworld/transcripts"] / total < 0.35 and 0.05 < size["supportworld/notes"] / total < 0.15
    with pytest.raises(ConfigError, match=r"record_notes \+ supportworld.transcripts = 1.1 must be < 1"):
        generate(SupportWorldConfig(record_notes=0.5, transcripts=0.6), tmp_path / "bad")
