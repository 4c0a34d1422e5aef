"""Human-evaluation statistics: bootstrap intervals that cover, Bradley–Terry ratings that recover known
strengths the way Chatbot Arena computes them, win rates with ties, outlying reviewers, and the whole
report read from a real feedback store and printed by ``chatforge feedback stats``."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
from sqlalchemy import select

from chatforge.cli import main
from chatforge.errors import ChatforgeError
from chatforge.eval.human import (
    Comparison,
    HumanEvalError,
    bootstrap_bradley_terry,
    bootstrap_mean,
    bradley_terry,
    outliers,
    reviewer_outliers,
    wilson,
    win_rates,
)
from chatforge.eval.human import (
    human_eval_stats as via_eval,
)
from chatforge.store.db import Store
from chatforge.store.models import Prompt
from chatforge.store.service import (
    add_message,
    add_response,
    assign,
    create_conversation,
    create_user,
    import_dataset,
    next_assignment,
    set_message_feedback,
    submit_ranking,
    submit_rating,
)
from chatforge.store.stats import human_eval_stats

# --------------------------------------------------------------------------- bootstrap


def test_the_bootstrap_interval_covers_the_true_mean_at_about_the_nominal_rate():
    rng = np.random.default_rng(0)
    covered = 0
    for k in range(400):
        x = rng.normal(3.0, 1.0, 50)
        mean, lo, hi = bootstrap_mean(x, n_boot=1000, seed=k)
        assert lo < mean < hi and mean == pytest.approx(x.mean())
        covered += lo <= 3.0 <= hi
    assert 0.92 <= covered / 400 <= 0.975  # nominal 0.95; 400 draws give a standard error of about 0.011


def test_the_cluster_bootstrap_covers_where_resampling_single_judgements_does_not():
    # 50 responses, each rated by 3 reviewers: the ratings of one response share its quality
    rng = np.random.default_rng(1)
    naive = clustered = 0
    n_sims = 300
    for k in range(n_sims):
        quality = rng.normal(0.0, 1.0, 50)
        values = np.repeat(quality, 3) + rng.normal(0.0, 0.5, 150)
        clusters = np.repeat(np.arange(50), 3).tolist()
        _, lo, hi = bootstrap_mean(values, n_boot=500, seed=k)
        naive += lo <= 0.0 <= hi
        _, lo, hi = bootstrap_mean(values, n_boot=500, seed=k, clusters=clusters)
        clustered += lo <= 0.0 <= hi
    assert 0.92 <= clustered / n_sims <= 0.975
    assert naive / n_sims < 0.85  # too narrow by about 1.6 (the design effect 1 + 2 x 0.8), so about 0.78


def test_bootstrap_mean_rejects_bad_input():
    with pytest.raises(HumanEvalError, match="non-empty"):
        bootstrap_mean([])
    with pytest.raises(HumanEvalError, match="alpha"):
        bootstrap_mean([1, 2], alpha=1.5)
    with pytest.raises(HumanEvalError, match="cluster keys"):
        bootstrap_mean([1, 2, 3], clusters=[0, 1])
    with pytest.raises(HumanEvalError, match="score must be 1, 0.5 or 0"):
        win_rates([Comparison("a", "b", 0.7, "r", 1)])


# --------------------------------------------------------------------------- win rates and Bradley–Terry


def test_win_rates_count_ties_half():
    cs = [Comparison("b", "a", 1.0, "r1", 1), Comparison("a", "b", 1.0, "r1", 2), Comparison("a", "b", 1.0, "r2", 3),
          Comparison("a", "b", 0.5, "r1", 4)]
    (w,) = win_rates(cs)
    assert (w["a"], w["b"], w["n"], w["wins_a"], w["wins_b"], w["ties"]) == ("a", "b", 4, 2, 1, 1)
    assert w["win_rate_a"] == pytest.approx(2.5 / 4) and w["tie_rate"] == 0.25
    assert w["ci_95"] == pytest.approx(list(wilson(2.5, 4)))
    assert w["agreement"] == {"pairwise": None, "n_pairs": 0}  # no unit judged twice


def test_win_rate_agreement_lines_up_judgements_of_one_unit_in_either_orientation():
    cs = [Comparison("a", "b", 1.0, "r1", "u1"), Comparison("b", "a", 0.0, "r2", "u1"),  # agree: a won
          Comparison("a", "b", 1.0, "r1", "u2"), Comparison("a", "b", 0.5, "r2", "u2")]  # disagree
    (w,) = win_rates(cs)
    assert w["agreement"] == {"pairwise": 0.5, "n_pairs": 2}


def test_a_tie_counts_as_one_win_for_each_side_as_arena_duplicates_it():
    # one win and one tie for a: Arena's rows are a, a, b -> P(a beats b) = 2/3
    ratings = bradley_terry([Comparison("a", "b", 1.0, "r", 1), Comparison("a", "b", 0.5, "r", 2)],
                            baseline="b", l2=1e-9)
    assert ratings["b"] == 1000.0
    assert ratings["a"] - ratings["b"] == pytest.approx(400 * math.log10(2), abs=1e-3)
    # two ties only: equal ratings; the mean sits at 1000 without a baseline
    even = bradley_terry([Comparison("a", "b", 0.5, "r", 1), Comparison("b", "a", 0.5, "r", 2)])
    assert even == pytest.approx({"a": 1000.0, "b": 1000.0})


def _simulated_battles(true: dict[str, float], n: int, seed: int) -> list[Comparison]:
    """Battles between random pairs. Ties are drawn so that a tie split in two (Arena's model) has the
    expected score of the Bradley–Terry probability p: P(tie) = t, P(win) = p(1 + t) - t."""
    rng = np.random.default_rng(seed)
    names = list(true)
    strength = np.array([true[v] for v in names])
    x = rng.integers(0, len(names), n)
    y = (x + rng.integers(1, len(names), n)) % len(names)  # a different version
    p = 1.0 / (1.0 + 10 ** ((strength[y] - strength[x]) / 400))
    tie = 0.4 * np.minimum(p, 1 - p)
    draw = rng.random(n)
    score = np.where(draw < tie, 0.5, np.where(draw < tie + p * (1 + tie) - tie, 1.0, 0.0))
    return [Comparison(names[a], names[b], float(sc), f"r{u % 7}", u)
            for u, (a, b, sc) in enumerate(zip(x.tolist(), y.tolist(), score.tolist()))]


def test_bradley_terry_recovers_known_strengths_with_ties():
    true = {"base": 1000.0, "better": 1100.0, "worse": 880.0, "best": 1250.0, "close": 1030.0}
    battles = _simulated_battles(true, 6000, seed=3)
    assert sum(c.score == 0.5 for c in battles) > 500
    bt = bootstrap_bradley_terry(battles, baseline="base", n_boot=200, seed=0)
    got = {r["version"]: r for r in bt["ratings"]}
    assert got["base"]["rating"] == 1000.0 and got["base"]["ci_95"] == [1000.0, 1000.0]
    for name, rating in true.items():
        assert got[name]["rating"] == pytest.approx(rating, abs=25), name
        if name != "base":
            lo, hi = got[name]["ci_95"]
            assert lo < got[name]["rating"] < hi and hi - lo < 80
    assert [r["version"] for r in bt["ratings"]] == sorted(true, key=lambda v: -true[v])
    assert bt["connected"] and bt["n_battles"] == 6000 and (bt["scale"], bt["base"], bt["init"]) == (400, 10, 1000)
    assert sum(r["n"] for r in bt["ratings"]) == 2 * 6000


def test_bradley_terry_intervals_cover_the_true_ratings_at_about_the_nominal_rate():
    true = {"a": 1000.0, "b": 1080.0, "c": 930.0}
    n_sims = 100
    covered = dict.fromkeys(("b", "c"), 0)
    for k in range(n_sims):
        bt = bootstrap_bradley_terry(_simulated_battles(true, 300, seed=100 + k), baseline="a", n_boot=100, seed=k)
        for r in bt["ratings"]:
            if r["version"] in covered:
                covered[r["version"]] += r["ci_95"][0] <= true[r["version"]] <= r["ci_95"][1]
    for version, n in covered.items():  # nominal 0.95; 100 draws give a standard error of about 0.022
        assert 0.88 <= n / n_sims <= 1.0, version


def test_bradley_terry_stays_finite_for_perfect_records_and_disconnected_versions():
    cs = [Comparison("a", "b", 1.0, "r", i) for i in range(10)] + [Comparison("c", "d", 0.5, "r", 99)]
    bt = bootstrap_bradley_terry(cs, baseline="b", n_boot=50)
    got = {r["version"]: r["rating"] for r in bt["ratings"]}
    assert all(math.isfinite(v) for v in got.values())
    assert got["a"] > 1400  # far ahead, but not infinitely
    assert not bt["connected"]


def test_bradley_terry_names_an_unknown_baseline():
    with pytest.raises(HumanEvalError, match=r"baseline 'zzz'.*versions compared are a, b"):
        bradley_terry([Comparison("a", "b", 1.0, "r", 1)], baseline="zzz")


# --------------------------------------------------------------------------- reviewers


def test_a_reviewer_answering_at_random_is_flagged():
    rng = random.Random(0)
    quality = {"v1": 0, "v2": 1, "v3": 2}
    comparisons, ratings = [], []
    for unit in range(30):
        for reviewer in ("ann", "bob", "cat", "dan", "rnd"):
            for a, b in (("v1", "v2"), ("v1", "v3"), ("v2", "v3")):
                if reviewer == "rnd":
                    score = float(rng.random() < 0.5)
                else:  # the better version wins, but people slip now and then
                    score = float(quality[a] > quality[b]) if rng.random() > 0.1 else float(quality[a] < quality[b])
                comparisons.append(Comparison(a, b, score, reviewer, (unit, a, b)))
            truth = rng.choice([1, 2, 3, 4, 5])
            for reviewer in ("ann", "bob", "cat", "dan", "rnd"):
                score = rng.randint(1, 5) if reviewer == "rnd" else min(5, max(1, truth + rng.choice([-1, 0, 0, 1])))
                ratings.append((reviewer, ("r", unit, "x"), score))
    rows = {r["reviewer"]: r for r in reviewer_outliers(comparisons, ratings)}
    assert [name for name, r in rows.items() if r["flagged"]] == ["rnd"]
    assert len(rows["rnd"]["reasons"]) == 2
    assert "shared ranking pairs" in rows["rnd"]["reasons"][0] and "correlate" in rows["rnd"]["reasons"][1]
    assert rows["rnd"]["rank_agreement"]["score"] < 0.65 < rows["ann"]["rank_agreement"]["score"]
    assert rows["ann"]["rank_agreement"]["n_shared"] == 30 * 3 * 4


def test_outliers_need_enough_reviewers_and_shared_units_and_a_real_gap():
    assert outliers({"a": (0.9, 50), "b": (0.2, 50)}) == {}  # two reviewers: who is the odd one?
    assert outliers({"a": (0.9, 50), "b": (0.9, 50), "c": (0.2, 5)}) == {}  # c shares too little
    near = outliers({"a": (0.90, 50), "b": (0.90, 50), "c": (0.90, 50), "d": (0.86, 50)})
    assert not any(f["flagged"] for f in near.values())  # 0.04 below a unanimous team is no outlier


# --------------------------------------------------------------------------- from the store


@pytest.fixture
def store(db_url):
    """A small store (SQLite, and PostgreSQL when a server is given): two prompts answered by three
    versions, ranked and rated by two reviewers, and a chat where one reviewer thumbed two regenerated
    answers."""
    s = Store(db_url)
    admin = create_user(s, "admin", "pw-adminadmin", "admin")
    users = {n: create_user(s, n, f"pw-{n * 4}", "reviewer") for n in ("ann", "bob")}
    ds = import_dataset(s, "eval", "prompts", [{"prompt": "q1"}, {"prompt": "q2"}], admin["id"])
    with s.session(write=False) as sess:
        pids = list(sess.scalars(select(Prompt.id).where(Prompt.dataset_id == ds["id"]).order_by(Prompt.id)))
    resp = {}
    for pid in pids:
        for model, version in (("sft", "v1"), ("dpo", "v2"), ("ppo", None)):
            resp[(pid, model)] = add_response(s, pid, model, version, f"{model} answer {pid}")
    assign(s, ds["id"], "rank", ["ann", "bob"], 2)
    assign(s, ds["id"], "rate", ["ann", "bob"], 2)
    # both rank dpo > ppo > sft on q1; on q2 ann has dpo > sft > ppo, bob sft > dpo > ppo
    q1, q2 = pids
    orders = {("ann", q1): ["dpo", "ppo", "sft"], ("bob", q1): ["dpo", "ppo", "sft"],
              ("ann", q2): ["dpo", "sft", "ppo"], ("bob", q2): ["sft", "dpo", "ppo"]}
    for name, u in users.items():
        while (a := next_assignment(s, u["id"], "rank")) is not None:
            pid = a["prompt"]["id"]
            submit_ranking(s, u["id"], a["assignment_id"], [resp[(pid, m)] for m in orders[(name, pid)]])
        while (a := next_assignment(s, u["id"], "rate")) is not None:
            model = a["response"]["text"].split()[0]
            base = {"sft": 3, "dpo": 4, "ppo": 2}[model] + (name == "bob")
            submit_rating(s, u["id"], a["assignment_id"], {"fluency": min(5, base), "coherence": base,
                                                            "relevance": 3, "appropriateness": 5})
    conv = create_conversation(s, users["ann"]["id"], "chat")
    add_message(s, conv, "user", "hello")
    m1 = add_message(s, conv, "assistant", "hi (sft)", model_id="sft", model_version="v1")
    m2 = add_message(s, conv, "assistant", "hi (dpo)", model_id="dpo", model_version="v2")
    set_message_feedback(s, users["ann"]["id"], m1, 1, None)
    set_message_feedback(s, users["ann"]["id"], m2, 1, None)  # both up: a tie
    yield s
    s.close()


def test_human_eval_stats_of_a_store(store):
    stats = human_eval_stats(store, baseline="sft@v1", n_boot=200)
    json.dumps(stats, allow_nan=False)  # JSON-able, no NaN
    assert via_eval(store, baseline="sft@v1", n_boot=200) == stats  # the same, seeded, through eval.human
    assert stats["versions"] == ["dpo@v2", "ppo", "sft@v1"]
    assert stats["counts"] == {"ratings": 12, "rankings": 4, "comparisons": 13, "thumb_comparisons": 1,
                               "reviewers": 2}
    sft = stats["likert"]["sft@v1"]
    assert set(sft) == {"fluency", "coherence", "relevance", "appropriateness", "overall"}
    assert sft["coherence"]["mean"] == pytest.approx(3.5) and sft["coherence"]["n"] == 4
    assert sft["coherence"]["n_responses"] == 2 and sft["coherence"]["n_reviewers"] == 2
    lo, hi = sft["coherence"]["ci_95"]
    assert lo <= 3.5 <= hi
    assert sft["relevance"]["agreement"] == {"krippendorff_alpha": None, "n_units": 2}  # all 3s: undefined
    pairs = {(w["a"], w["b"]): w for w in stats["win_rates"]}
    # dpo vs sft: rankings 3 of 4 for dpo, the chat thumbs a tie
    w = pairs[("dpo@v2", "sft@v1")]
    assert (w["n"], w["wins_a"], w["wins_b"], w["ties"]) == (5, 3, 1, 1)
    assert w["win_rate_a"] == pytest.approx(3.5 / 5)
    assert w["agreement"] == {"pairwise": 0.5, "n_pairs": 2}  # agree on q1, not on q2
    assert pairs[("dpo@v2", "ppo")]["wins_a"] == 4
    bt = {r["version"]: r for r in stats["bradley_terry"]["ratings"]}
    assert bt["sft@v1"]["rating"] == 1000.0 and bt["dpo@v2"]["rating"] > 1000.0
    assert stats["bradley_terry"]["ratings"][0]["version"] == "dpo@v2"
    assert stats["agreement"]["rank"]["n_pairs"] == 6
    assert [r["reviewer"] for r in stats["reviewers"]] == ["ann", "bob"] and stats["flagged_reviewers"] == []
    # one dataset only: the chat thumbs are not in it
    only = human_eval_stats(store, dataset="eval", n_boot=50)
    assert only["counts"]["thumb_comparisons"] == 0 and only["counts"]["comparisons"] == 12
    assert only["baseline"] is None
    assert np.mean([r["rating"] for r in only["bradley_terry"]["ratings"]]) == pytest.approx(1000.0)


def test_human_eval_stats_names_an_unknown_dataset_or_baseline(store):
    with pytest.raises(ChatforgeError, match=r"no feedback dataset named 'nope'.*prompt datasets are: eval"):
        human_eval_stats(store, dataset="nope")
    with pytest.raises(ChatforgeError, match=r"baseline 'sft'.*compared versions are: dpo@v2, ppo, sft@v1"):
        human_eval_stats(store, baseline="sft")


def test_human_eval_stats_of_an_empty_store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'empty.db'}")
    stats = human_eval_stats(s)
    s.close()
    assert stats["versions"] == [] and stats["likert"] == {} and stats["win_rates"] == []
    assert stats["bradley_terry"] is None and stats["reviewers"] == []


def test_the_cli_prints_tables_and_json(store, capsys):
    url = store.url
    main(["feedback", "stats", "--db", url, "--baseline", "sft@v1", "--n-boot", "50"])
    out = capsys.readouterr().out
    assert "Likert ratings" in out and "Pairwise win rates" in out and "Bradley-Terry ratings" in out
    assert "dpo@v2" in out and "Reviewers" in out
    main(["feedback", "stats", "--db", url, "--dataset", "eval", "--json", "--n-boot", "50"])
    parsed = json.loads(capsys.readouterr().out)
    assert parsed["dataset"] == "eval" and parsed["counts"]["rankings"] == 4


def test_the_cli_reports_an_unknown_dataset(store, capsys):
    assert main(["feedback", "stats", "--db", store.url, "--dataset", "nope"]) == 2
    assert "no feedback dataset named 'nope'" in capsys.readouterr().err


def test_a_random_reviewer_in_a_real_store_is_flagged(tmp_path):
    """Five reviewers rank and rate three versions' answers to ten prompts; four follow the truth
    (with an occasional slip), one answers at random."""
    rng = random.Random(4)
    s = Store(f"sqlite:///{tmp_path / 'feedback.db'}")
    admin = create_user(s, "admin", "pw-adminadmin", "admin")
    names = ["ann", "bob", "cat", "dan", "rnd"]
    users = {n: create_user(s, n, f"pw-{n * 4}", "reviewer") for n in names}
    ds = import_dataset(s, "sim", "prompts", [{"prompt": f"q{i}"} for i in range(10)], admin["id"])
    quality = {}
    with s.session(write=False) as sess:
        pids = list(sess.scalars(select(Prompt.id).where(Prompt.dataset_id == ds["id"])))
    for pid in pids:
        for model, mean in (("a", 2.0), ("b", 3.0), ("c", 4.0)):
            rid = add_response(s, pid, model, "1", f"{model} {pid}")
            quality[rid] = mean + rng.uniform(-1, 1)  # this answer's true quality
    assign(s, ds["id"], "rank", names, 5)
    assign(s, ds["id"], "rate", names, 5)
    for name, u in users.items():
        while (a := next_assignment(s, u["id"], "rank")) is not None:
            ids = [r["id"] for r in a["responses"]]
            if name == "rnd":
                rng.shuffle(ids)
            else:
                ids.sort(key=lambda i: -(quality[i] + rng.gauss(0, 0.3)))
            submit_ranking(s, u["id"], a["assignment_id"], ids)
        while (a := next_assignment(s, u["id"], "rate")) is not None:
            q = quality[a["response"]["id"]]
            score = rng.randint(1, 5) if name == "rnd" else min(5, max(1, round(q + rng.gauss(0, 0.5))))
            submit_rating(s, u["id"], a["assignment_id"], dict.fromkeys(
                ("fluency", "coherence", "relevance", "appropriateness"), score))
    stats = human_eval_stats(s, dataset="sim", baseline="a@1", n_boot=100)
    s.close()
    assert stats["flagged_reviewers"] == ["rnd"]
    (rnd,) = [r for r in stats["reviewers"] if r["reviewer"] == "rnd"]
    assert len(rnd["reasons"]) == 2 and "39% of 120 shared ranking pairs" in rnd["reasons"][0]
    assert rnd["rank_agreement"]["n_shared"] == 10 * 3 * 4 and rnd["rating_correlation"]["n_shared"] == 30
    assert [r["version"] for r in stats["bradley_terry"]["ratings"]] == ["c@1", "b@1", "a@1"]
    assert stats["likert"]["c@1"]["overall"]["mean"] > stats["likert"]["a@1"]["overall"]["mean"]


def test_version_label_does_not_repeat_a_version_the_model_id_names():
    from chatforge.store.stats import version_label

    assert version_label("r-dpo", "ff150afd408f") == "r-dpo@ff150afd408f"
    assert version_label("r-dpo@ff150afd408f", "ff150afd408f") == "r-dpo@ff150afd408f"
    assert version_label("r-dpo", None) == "r-dpo"
