"""Feedback rounds: the next data from feedback + previous data, simulated reviewers through the app's API,
and the promotion rule (not worse on every guarded metric, with its interval)."""

from __future__ import annotations

import datetime as dt
import json
import random

import pytest
from fastapi.testclient import TestClient
from serve_fixtures import ADMIN_PASSWORD, save_tiny_model, settings_for

from chatforge.config import SupportWorldConfig
from chatforge.data.supportworld import generate
from chatforge.errors import ConfigError
from chatforge.eval.checks import SupportChecks, is_support_row
from chatforge.eval.simulate import SIMULATED_COMMENT, simulate_feedback
from chatforge.io import read_jsonl
from chatforge.rounds import Guard, build_round_data, compare, parse_guards, per_prompt
from chatforge.serve.app import create_app
from chatforge.store.db import Store
from chatforge.store.export import export_feedback

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def figures(n: int, rate: float, seed: int) -> dict[str, dict[str, float]]:
    rng = random.Random(seed)
    return {str(i): {"checks_mean": float(rng.random() < rate), "no_leak": 1.0} for i in range(n)}


def test_promotion_refuses_a_worse_challenger_and_accepts_one_that_is_not():
    champion = figures(400, 0.6, 0)
    same = {k: dict(v) for k, v in champion.items()}
    better = {k: {**v, "checks_mean": 1.0 if int(k) % 3 == 0 else v["checks_mean"]} for k, v in champion.items()}
    worse = {k: {**v, "checks_mean": 0.0 if int(k) % 4 == 0 else v["checks_mean"]} for k, v in champion.items()}
    leaky = {k: {**v, "no_leak": 0.0 if int(k) % 10 == 0 else 1.0} for k, v in better.items()}
    guards = [Guard("checks_mean", 0.01), Guard("no_leak", 0.01)]
    for challenger, promoted in ((same, True), (better, True), (worse, False), (leaky, False)):
        ok, reasons, figs = compare(champion, challenger, guards)
        assert ok is promoted, reasons
        assert len(reasons) == 2 and all(figs[g.metric]["n"] == 400 for g in guards)
    ok, reasons, figs = compare(champion, worse, guards)
    assert "checks_mean" in reasons[0] and "may be worse" in reasons[0] and figs["checks_mean"]["diff"] < 0
    assert figs["checks_mean"]["ci95"][1] < 0
    # a tiny set cannot promote: the interval is too wide to rule out a 1-point loss
    small = {k: v for k, v in champion.items() if int(k) < 10}
    assert compare(small, {k: dict(v) for k, v in small.items()}, guards)[0] is True  # identical: interval 0
    base = {k: {**v, "checks_mean": 1.0 if k == "0" else 0.0 if k == "1" else v["checks_mean"]}
            for k, v in small.items()}
    swapped = {k: {**v, "checks_mean": 1 - v["checks_mean"] if k in ("0", "1") else v["checks_mean"]}
               for k, v in base.items()}  # one prompt won, one lost: the same mean, a wide interval
    ok, reasons, figs = compare(base, swapped, guards)
    assert ok is False and figs["checks_mean"]["diff"] == 0 and figs["checks_mean"]["ci95"][0] < -0.01
    assert compare(champion, {}, guards)[0] is False  # nothing measured on both


def test_guards_are_checked():
    assert parse_guards(["checks_mean:0.02", "ended"]) == [Guard("checks_mean", 0.02), Guard("ended", 0.0)]
    with pytest.raises(ConfigError, match="'bleu' is not a guarded metric"):
        parse_guards(["bleu:1"])
    with pytest.raises(ConfigError, match="must be a number"):
        parse_guards(["no_leak:x"])
    with pytest.raises(ConfigError, match="at least one"):
        parse_guards([])


def test_per_prompt_figures_skip_checks_that_do_not_apply():
    got = per_prompt([{"id": 1, "checks": {"status": True, "order_number": None, "name": False}},
                      {"id": 2, "skipped": "too long"}])
    assert got == {"1": {"status": 1.0, "name": 0.0, "checks_mean": 0.5, "all": 0.0}}


def _pair(prompt: str, a: str, b: str, when: dt.datetime, user: str = "u") -> dict:
    return {"prompt": [{"role": "user", "content": prompt}], "chosen": [{"role": "assistant", "content": a}],
            "rejected": [{"role": "assistant", "content": b}], "meta": {"created_at": when.isoformat(), "user": user}}


def test_round_data_takes_new_feedback_removes_repeats_and_contradictions():
    later, earlier = T0 + dt.timedelta(hours=1), T0 - dt.timedelta(hours=1)
    previous_sft = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                     "record": {"kept": True}}]
    feedback = {
        "sft": [{"messages": previous_sft[0]["messages"], "meta": {"created_at": later.isoformat()}},  # a repeat
                {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                 "meta": {"created_at": later.isoformat()}},
                {"messages": [{"role": "user", "content": "old"}, {"role": "assistant", "content": "x"}],
                 "meta": {"created_at": earlier.isoformat()}}],  # before the champion: already used
        "preferences": [_pair("p", "good", "bad", later, "r1"), _pair("p", "good", "bad", later, "r2"),
                        _pair("p", "x", "y", later, "r1"), _pair("p", "y", "x", later, "r2"),  # contradicted
                        _pair("p", "same", "same", later)],  # no preference
    }
    previous_pairs = [_pair("p", "good", "bad", earlier)]
    sft, pairs, counts = build_round_data(feedback, previous_sft, previous_pairs, T0)
    assert [r["messages"][-1]["content"] for r in sft] == ["hello", "a"] and sft[0]["record"] == {"kept": True}
    assert counts["feedback_sft"] == 2 and counts["sft_duplicates"] == 1
    assert [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in pairs] == [("good", "bad")]
    assert counts["feedback_pairs"] == 5 and counts["feedback_pairs_contradicted"] == 1 and counts["pairs"] == 1
    # replay: previous rows kept per new row, drawn at random
    many = [{"messages": [{"role": "user", "content": f"m{i}"}]} for i in range(50)]
    sft, _, counts = build_round_data(feedback, many, [], T0, replay=2.0, seed=1)
    assert counts["previous_sft_kept"] == 4 and len(sft) == 6 and sft[:4] != many[:4]


@pytest.fixture(scope="module")
def support_rows(tmp_path_factory):
    d = tmp_path_factory.mktemp("sw")
    generate(SupportWorldConfig(seed=11, corpus_mb=0.02, n_products=60, n_customers=90, n_reviews=60,
                                n_conversations=300, n_translations=30, n_candidates=8), d)
    rows = [r for _, r in read_jsonl(d / "conversations" / "val.jsonl") if is_support_row(r)][:5]
    return rows, SupportChecks.for_data(d / "conversations" / "val.jsonl")


def test_simulated_reviewers_rank_and_rate_through_the_api_and_say_so(tmp_path, support_rows):
    rows, checks = support_rows
    model = save_tiny_model(tmp_path / "m", context=2048)  # SupportWorld records are long in bytes
    app = create_app(settings_for(tmp_path, [("tiny", model)]))
    with TestClient(app) as client:
        out = simulate_feedback(client, rows, ADMIN_PASSWORD, name="t", reviewers=3, overlap=2, samples=3,
                                max_tokens=12, checks=checks)
    assert out["dataset"] == "simulated-t" and out["generated"] == {"tiny": 15} and out["skipped"] == 0
    assert out["done"] == {"rank": 10, "rate": 15} and out["reviewers"][0] == "simulated-reviewer-1"
    counts = export_feedback(Store(f"sqlite:///{tmp_path / 'feedback.db'}"), tmp_path / "export")
    assert counts["preferences"] == 10 * 3  # 5 prompts x 2 reviewers x 3 pairs from 3 answers
    ratings = [r for _, r in read_jsonl(tmp_path / "export" / "ratings.jsonl")]
    assert len(ratings) == 15 and all(r["comment"] == SIMULATED_COMMENT for r in ratings)
    assert {r["meta"]["user"] for r in ratings} <= set(out["reviewers"])
    # one model's answers ranked by two reviewers each: no version comparison, but agreement on every shared pair
    from chatforge.store.stats import human_eval_stats

    stats = human_eval_stats(Store(f"sqlite:///{tmp_path / 'feedback.db'}"), n_boot=50)
    assert stats["win_rates"] == [] and stats["agreement"]["rank"]["n_pairs"] == 5 * 3
    assert all(r["rank_agreement"]["n_shared"] > 0 for r in stats["reviewers"])
    pairs = [r for _, r in read_jsonl(tmp_path / "export" / "preferences.jsonl")]
    assert all(p["meta"]["dataset"] == "simulated-t" and p["meta"]["user"].startswith("simulated-") for p in pairs)
    # a second simulation on the same database (the next round's) is played by the same reviewers;
    # one with another seed cannot log in as them: refused, before anything is assigned
    with TestClient(create_app(settings_for(tmp_path, [("tiny", model)]))) as client:
        again = simulate_feedback(client, rows, ADMIN_PASSWORD, name="t2", samples=2, max_tokens=4, rate=False,
                                  checks=checks)
        assert again["reviewers"] == out["reviewers"] and again["done"]["rank"] == 10
        with pytest.raises(Exception, match="password is not this simulation's"):
            simulate_feedback(client, rows, ADMIN_PASSWORD, name="t3", samples=2, max_tokens=4, seed=5,
                              checks=checks)
    assert json.loads(json.dumps(out))  # JSON-able for the script's output


def test_simulated_rankings_of_two_served_versions_give_win_rates_and_ratings(tmp_path, support_rows):
    rows, checks = support_rows
    a, b = save_tiny_model(tmp_path / "a", seed=1, context=2048), save_tiny_model(tmp_path / "b", seed=2, context=2048)
    with TestClient(create_app(settings_for(tmp_path, [("a", a), ("b", b)]))) as client:
        out = simulate_feedback(client, rows, ADMIN_PASSWORD, name="ab", reviewers=2, overlap=2, samples=1,
                                max_tokens=8, rate=False, checks=checks, models=["a", "b"])
    assert out["generated"] == {"a": 5, "b": 5} and out["done"]["rank"] == 10
    from chatforge.store.stats import human_eval_stats

    stats = human_eval_stats(Store(f"sqlite:///{tmp_path / 'feedback.db'}"), n_boot=50)
    (pair,) = stats["win_rates"]
    assert pair["n"] == 10  # 5 prompts x 2 reviewers, each ranking one answer of each version
    assert {r["version"] for r in stats["bradley_terry"]["ratings"]} == {pair["a"], pair["b"]}
