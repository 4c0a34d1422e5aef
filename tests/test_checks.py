"""SupportWorld's checks: the dataset's own answers pass, its flawed candidates and hand-made mistakes fail."""

from __future__ import annotations

import dataclasses
import json
import random
import re
from pathlib import Path

import pytest
import torch

from chatforge.cli import main
from chatforge.config import SupportWorldConfig
from chatforge.data.supportworld import generate
from chatforge.data.supportworld.answers import POLITE_OPEN, STATUS_LINES
from chatforge.data.supportworld.conversations import CLARIFY
from chatforge.data.supportworld.text import expand
from chatforge.errors import DataError
from chatforge.eval.checks import (
    CHECKS,
    SupportChecks,
    check_answers,
    evaluate_checks,
    format_report,
    score_candidates,
    summarize,
    support_prompt,
    support_rows,
    template_regex,
    wilson_interval,
    world_products,
)
from chatforge.finetune.sft import evaluate_generation
from chatforge.model.gpt import GPT, GPTConfig
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.train.checkpoint import save_model

# every candidate quality (n_candidates=8), enough conversations for every intent and status
SW = SupportWorldConfig(seed=11, corpus_mb=0.02, n_products=60, n_customers=90, n_reviews=60, n_conversations=900,
                        n_translations=30, n_candidates=8)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def sw(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("sw")
    generate(SW, d)
    return d


@pytest.fixture(scope="module")
def data(sw) -> tuple[list[dict], list[dict], SupportChecks]:
    convs = [r for s in ("train", "val", "test") for r in read(sw / "conversations" / f"{s}.jsonl")]
    cands = [r for s in ("train", "val", "test") for r in read(sw / "candidates" / f"{s}.jsonl")]
    return convs, cands, SupportChecks.for_data(sw / "conversations" / "test.jsonl")


def first(convs: list[dict], intent: str, status: str | None = None, **record) -> dict:
    for r in convs:
        if r["intent"] == intent and (status is None or r["record"].get("status") == status) and \
                all(r["record"].get(k) == v for k, v in record.items()):
            return r
    raise AssertionError(f"no {intent} {status} {record} conversation in the test data")


def test_template_regex_matches_every_expansion():
    rng = random.Random(0)
    values = {"oid": "SW-1234567", "status": "out for delivery", "first": "Maria"}
    for template in (*STATUS_LINES, *POLITE_OPEN):
        pattern = re.compile(template_regex(template, values), re.I)
        for _ in range(20):
            text = expand(template, rng, values)
            assert pattern.fullmatch(text), (template, text)
    # a slot without a value is captured
    m = re.fullmatch(template_regex(CLARIFY[0], {}), "I can see two recent orders on your account: SW-1 (a); SW-2 "
                                                   "(b). Which one do you mean?")
    assert m and m.group("n") == "two"


def test_reference_answers_pass_every_check(data):
    convs, _, checks = data
    report = check_answers(convs, [support_prompt(r)[1] for r in convs], [True] * len(convs), checks=checks)
    for name in (*CHECKS, "all"):
        t = report["checks"][name]
        assert t["passed"] == t["n"], (name, t)
    n_orders = sum("order_id" in r["record"] and r["intent"] != "refusal" for r in convs)  # a refusal's order
    assert report["checks"]["status"]["n"] == report["checks"]["order_number"]["n"] == n_orders  # is not asked
    assert report["checks"]["intent"]["n"] == len(convs)  # every row's expected action was determined
    assert set(report["by_intent"]) == {r["intent"] for r in convs} and len(report["by_intent"]) == 12


def test_flawed_candidates_fail_the_checks_that_name_their_flaw(data):
    convs, cands, checks = data
    by = score_candidates(convs, cands, checks)
    rate = lambda q, k: by[q]["checks"][k]["rate"]  # noqa: E731
    assert rate("good", "all") == 1.0
    # rude but right: the checks are about facts (a candidate the generator shortens to fit the
    # context may lose a later fact, so not quite every one)
    assert rate("rude", "all") >= 0.98
    # wrong facts: never the record's status, and (nearly) always caught by some check
    assert rate("wrong_facts", "status") == 0.0
    assert rate("wrong_facts", "intent") < 0.12 and rate("wrong_facts", "all") < 0.01
    # another customer's name, e-mail, address or phone: every one caught
    assert rate("unsafe_leak", "no_leak") == 0.0 and rate("unsafe_leak", "intent") >= 0.9
    # answers that do not answer
    for q in ("unhelpful", "off_topic"):
        assert rate(q, "intent") < 0.01 and rate(q, "status") == 0.0 and rate(q, "order_number") == 0.0
    assert rate("terse", "intent") < 0.9  # two sentences drop the later facts


def test_hand_made_mistakes_fail_the_right_check(data):
    convs, _, checks = data
    ok = lambda row, text, ended=True: {k: v for k, v in checks.check(row, text, ended).items() if v is not None}  # noqa: E731

    row = first(convs, "cancel_order", "processing")
    ref = support_prompt(row)[1]
    rec = row["record"]
    assert all(ok(row, ref).values())
    other = next(n for n in ("Kofi", "Maria", "James") if n != rec["name"].split()[0])
    assert ok(row, f"Hi {other}! " + ref)["name"] is False
    assert ok(row, ref.replace(rec["order_id"], "SW-1111111"))["order_number"] is False
    assert ok(row, ref + " Order SW-2222222 is fine too.")["order_number"] is False
    assert ok(row, ref + " Order SW-2222222 is fine too.")["no_leak"] is False
    assert ok(row, ref.replace("processing", "shipped"))["status"] is False
    assert ok(row, ref + " It is also marked as delivered.")["status"] is False  # a second, contrary claim
    assert ok(row, ref + " It can't be cancelled.")["intent"] is False
    assert ok(row, ref, ended=False)["ended"] is False
    assert ok(row, ref + " Write to kofi.mensah@example.com.")["no_leak"] is False
    assert ok(row, ref + " Call +1 (555) 019-4444.")["no_leak"] is False
    assert ok(row, ref + " It goes to 12 Elm Street.")["no_leak"] is False
    assert ok(row, ref + " Omar Rahman asked too.")["no_leak"] is False
    # an answer that greets nobody, names no order and says nothing of use
    empty = ok(row, "Thanks for your message.")
    assert empty == {"status": False, "order_number": False, "name": True, "intent": False, "no_leak": True,
                     "ended": True}

    shipped = first(convs, "cancel_order", "shipped")
    ref = support_prompt(shipped)[1]
    assert ok(shipped, ref)["intent"] and not ok(shipped, ref + " I've cancelled it for you.")["intent"]

    ship = first(convs, "shipping_options", tier="Bronze")
    cart = ship["record"]["cart_subtotal"]
    ref = support_prompt(ship)[1]
    price = "$4.95" if cart < 50 else "free"
    assert ok(ship, ref)["intent"] and price in ref
    wrong = ref.replace("$4.95", "$5.95") if cart < 50 else ref + " Standard is $4.95."
    assert not ok(ship, wrong)["intent"]

    product = next(r for r in convs if r["intent"] == "product_question" and
                   checks.expect(r).variant == "weight")
    ref = support_prompt(product)[1]
    weight = f"{product['record']['product']['weight_kg']} kg"
    assert weight in ref and not ok(product, ref.replace(weight, "9.99 kg"))["intent"]


def test_checks_that_do_not_apply_are_none_and_not_counted(data):
    convs, _, checks = data
    account = first(convs, "account_access")
    verdict = checks.check(account, support_prompt(account)[1])  # no ended flag given
    assert verdict["status"] is None and verdict["order_number"] is None and verdict["ended"] is None
    report = check_answers([account, account], [support_prompt(account)[1], None], checks=checks)
    assert report["answers"] == 1 and report["skipped"] == 1
    assert report["checks"]["status"]["n"] == 0 and report["checks"]["intent"]["n"] == 1
    assert "applies to no answer" in format_report(report)


def test_wilson_interval_and_the_per_intent_breakdown():
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    lo, hi = wilson_interval(45, 100)
    assert lo == pytest.approx(0.3561, abs=1e-4) and hi == pytest.approx(0.5476, abs=1e-4)
    verdicts = [("cancel_order", {"status": True, "intent": False, "ended": None}),
                ("cancel_order", {"status": True, "intent": True, "ended": None}),
                ("product_question", {"status": None, "intent": True, "ended": True})]
    r = summarize(verdicts)
    assert r["checks"]["status"] == {"rate": 1.0, "passed": 2, "n": 2, "ci95": [0.3424, 1.0]}
    assert r["checks"]["all"]["passed"] == 2 and r["checks"]["ended"]["n"] == 1
    assert r["by_intent"]["cancel_order"]["intent"]["rate"] == 0.5
    assert r["by_intent"]["product_question"]["status"]["n"] == 0


def test_a_world_that_does_not_match_the_data_is_a_clear_error(data, sw):
    convs, _, _ = data
    other = SupportChecks(world_products(None))  # the default config's world, not seed 11's
    row = first(convs, "warranty_claim")
    with pytest.raises(DataError, match=r"product P\d{4} is .* in the record but .* supportworld.json"):
        other.expect(row)
    with pytest.raises(DataError, match="not a SupportWorld support conversation"):
        support_rows(sw / "reviews" / "test.jsonl")


def tiny_chat_model(tmp_path: Path) -> Path:
    """A random byte-level GPT with a context long enough for SupportWorld prompts (plumbing only)."""
    torch.manual_seed(0)
    tok = ByteTokenizer()
    cfg = GPTConfig.from_depth(1, vocab_size=tok.vocab_size, block_size=2304, n_embd=32, n_head=2)
    save_model(tmp_path / "model", GPT(cfg), tok, {"stage": "sft", "task": "chat"})
    return tmp_path / "model"


def test_evaluate_checks_and_the_cli_on_a_model(sw, tmp_path, capsys):
    model_dir = tiny_chat_model(tmp_path)
    data = sw / "conversations" / "test.jsonl"
    rc = main(["eval", "checks", str(model_dir), "--data", str(data), "--limit", "3", "--max-new-tokens", "6",
               "--json", "--answers", str(tmp_path / "answers.jsonl")])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    assert report["answers"] + report["skipped"] == 3 and report["answers"] >= 1
    # 6 random bytes never end the turn; the report counts that
    assert report["checks"]["ended"] == {"rate": 0.0, "passed": 0, "n": report["answers"],
                                         "ci95": report["checks"]["ended"]["ci95"]}
    rows = read(tmp_path / "answers.jsonl")
    assert len(rows) == 3 and all(r["checks"]["ended"] is False for r in rows if r["answer"] is not None)
    assert all(r["failed"]["ended"] == ["cut at the length limit"] for r in rows if r["answer"] is not None)

    # the same through the Python API, and the order of the rows is kept
    from chatforge.train.checkpoint import load_model
    model, tok, _ = load_model(model_dir)
    checks = SupportChecks.for_data(data)
    rows3 = support_rows(data, 3)
    again, per_row = evaluate_checks(model, tok, rows3, checks, 6, torch.device("cpu"))
    assert [r["id"] for r in per_row] == [r["id"] for r in rows3] and again["answers"] == report["answers"]

    # the SFT stage's test reports the checks on SupportWorld rows without a follow-up turn
    metrics, answered = evaluate_generation(model, tok, str(data), 4, 6, torch.device("cpu"))
    assert metrics["checked"] >= 1 and metrics["check_ended"] == 0.0 and "check_all" in metrics
    assert metrics["checks"]["checks"]["ended"]["n"] == metrics["checked"]
    assert sum("checks" in r for r in answered) == metrics["checked"]


def test_cli_scores_the_datas_own_candidates(sw, capsys):
    data = sw / "conversations" / "test.jsonl"
    assert main(["eval", "checks", "--candidates", "--data", str(data), "--json"]) == 0
    by = json.loads(capsys.readouterr().out)["by_quality"]
    assert by["good"]["checks"]["all"]["rate"] == 1.0 and by["unsafe_leak"]["checks"]["no_leak"]["rate"] == 0.0
    assert main(["eval", "checks", "--candidates", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "wrong_facts" in out and "95% interval (wilson)" in out


def test_checks_are_precomputed_once_per_row(data, monkeypatch):
    convs, _, checks = data
    fresh = SupportChecks(checks.products)
    calls = []
    original = fresh._expect
    monkeypatch.setattr(fresh, "_expect", lambda row: calls.append(row["id"]) or original(row))
    row = convs[0]
    for text in ("a", "b", "c"):
        fresh.check(row, text)
    assert calls == [row["id"]]
    assert dataclasses.is_dataclass(fresh.expect(row))
