"""Human-evaluation statistics of the feedback store (``chatforge feedback stats``).

Reads every judgement in one snapshot and hands it to ``chatforge.eval.human``:

- ratings: each ``Rating`` is one judgement per aspect of one response by one reviewer;
- comparisons: each ``Ranking`` of K responses gives one comparison per pair of responses of
  different versions (the higher-ranked one wins; blind A/B units from ``align compare`` are
  rankings of two). The ranking page has no "tie" button, so rankings never tie. Outside
  datasets (``dataset=None``), chat thumbs give comparisons too: a reviewer who thumbed two
  regenerated answers to the same message (siblings) from different versions compared them,
  and the same thumb on both is the store's one recorded tie.

A version is ``model_id@model_version`` (``model_id`` alone when the version is unknown).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import select

from chatforge.errors import ChatforgeError
from chatforge.eval.agreement import AgreementError, krippendorff_alpha
from chatforge.eval.human import (
    Comparison,
    bootstrap_bradley_terry,
    bootstrap_mean,
    finite_or_none,
    pair_agreement,
    reviewer_outliers,
    win_rates,
)
from chatforge.store.constants import RATING_ASPECTS
from chatforge.store.db import Store
from chatforge.store.models import Dataset, Message, MessageFeedback, Prompt, Ranking, Rating, Response, User

OVERALL = "overall"  # the mean of a rating's four aspects, summarised like an aspect


def version_label(model_id: str, model_version: str | None) -> str:
    if not model_version or model_id.endswith(f"@{model_version}"):  # serve names an older version NAME@VERSION
        return model_id
    return f"{model_id}@{model_version}"


def _read(store: Store, dataset: str | None
          ) -> tuple[list[dict[str, Any]], list[Comparison], list[Comparison], dict[str, int]]:
    with store.session(write=False) as s:
        ds_id = None
        if dataset is not None:
            ds_id = s.scalar(select(Dataset.id).where(Dataset.name == dataset))
            if ds_id is None:
                names = list(s.scalars(select(Dataset.name).where(Dataset.kind == "prompts").order_by(Dataset.name)))
                raise ChatforgeError(f"no feedback dataset named {dataset!r} in {store.safe_url}; "
                                     f"the prompt datasets are: {', '.join(names) or 'none yet'}")
        users = dict(s.execute(select(User.id, User.username)).all())
        q = select(Response.id, Response.prompt_id, Response.model_id, Response.model_version)
        if ds_id is not None:
            q = q.join(Prompt, Prompt.id == Response.prompt_id).where(Prompt.dataset_id == ds_id)
        responses = {rid: (pid, version_label(m, v)) for rid, pid, m, v in s.execute(q)}

        rating_q, ranking_q = select(Rating).order_by(Rating.id), select(Ranking).order_by(Ranking.id)
        if ds_id is not None:  # filtered in SQL: a big store's other datasets are never loaded
            in_ds = select(Prompt.id).where(Prompt.dataset_id == ds_id)
            rating_q = rating_q.where(Rating.response_id.in_(
                select(Response.id).where(Response.prompt_id.in_(in_ds))))
            ranking_q = ranking_q.where(Ranking.prompt_id.in_(in_ds))
        ratings = []
        for r in s.scalars(rating_q):
            if r.response_id in responses:
                ratings.append({"reviewer": users.get(r.user_id, str(r.user_id)), "response": r.response_id,
                                "version": responses[r.response_id][1],
                                **{a: float(getattr(r, a)) for a in RATING_ASPECTS}})

        comparisons: list[Comparison] = []  # between versions: win rates, Bradley-Terry
        judged: list[Comparison] = []  # every ranked pair of answers: reviewer agreement
        n_rankings = 0
        for rk in s.scalars(ranking_q):
            order = [i for i in rk.order if i in responses]  # a response deleted since is skipped
            if not order:  # another dataset's ranking (or every response deleted since)
                continue
            n_rankings += 1
            reviewer = users.get(rk.user_id, str(rk.user_id))
            for x, better in enumerate(order):
                for worse in order[x + 1:]:
                    a, b = responses[better][1], responses[worse][1]
                    unit = ("ranking", min(better, worse), max(better, worse))
                    # agreement is about answers, whatever model wrote them: every ranked pair counts,
                    # oriented by response id so that two reviewers' judgements of it line up
                    judged.append(Comparison(f"response {unit[1]}", f"response {unit[2]}",
                                             float(better == unit[1]), reviewer, unit))
                    if a != b:
                        comparisons.append(Comparison(a, b, 1.0, reviewer, unit))
        n_thumb = 0
        if ds_id is None:
            groups: dict[tuple[int, int, int | None], list[tuple[int, str, int]]] = defaultdict(list)
            rows = s.execute(select(MessageFeedback.user_id, MessageFeedback.thumb, Message.id, Message.conversation_id,
                                    Message.parent_id, Message.model_id, Message.model_version)
                             .join(Message, Message.id == MessageFeedback.message_id)
                             .where(MessageFeedback.thumb != 0, Message.role == "assistant",
                                    Message.model_id.is_not(None)).order_by(MessageFeedback.id))
            for uid, thumb, mid, conv, parent, model, version in rows:
                groups[(uid, conv, parent)].append((mid, version_label(model, version), thumb))
            for (uid, _, _), msgs in groups.items():
                for x in range(len(msgs)):
                    for y in range(x + 1, len(msgs)):
                        (m1, v1, t1), (m2, v2, t2) = msgs[x], msgs[y]
                        if v1 != v2:
                            score = 0.5 if t1 == t2 else float(t1 > t2)
                            comparisons.append(Comparison(v1, v2, score, users.get(uid, str(uid)),
                                                          ("thumbs", min(m1, m2), max(m1, m2)), "thumbs"))
                            n_thumb += 1
    counts = {"ratings": len(ratings), "rankings": n_rankings, "comparisons": len(comparisons),
              "thumb_comparisons": n_thumb}
    return ratings, comparisons, judged, counts


def _alpha(rows: list[dict[str, Any]], aspect: str) -> dict[str, Any]:
    """Krippendorff's alpha (interval, as ``service.agreement`` computes it) over the responses
    of ``rows`` that two or more reviewers rated."""
    by_response: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        by_response[r["response"]].append(r[aspect])
    units = [v for v in by_response.values() if len(v) >= 2]
    if not units:
        return {"krippendorff_alpha": None, "n_units": 0}
    try:
        alpha = krippendorff_alpha(units, "interval")
    except AgreementError:
        alpha = float("nan")
    return {"krippendorff_alpha": finite_or_none(alpha), "n_units": len(units)}


def _likert(ratings: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, dict[str, Any]]:
    by_version: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in ratings:
        by_version[r["version"]].append({**r, OVERALL: sum(r[a] for a in RATING_ASPECTS) / len(RATING_ASPECTS)})
    out: dict[str, dict[str, Any]] = {}
    for version, rows in sorted(by_version.items()):
        out[version] = {}
        for aspect in (*RATING_ASPECTS, OVERALL):
            mean, lo, hi = bootstrap_mean([r[aspect] for r in rows], n_boot=n_boot, seed=seed,
                                          clusters=[r["response"] for r in rows])
            out[version][aspect] = {"mean": mean, "ci_95": [lo, hi], "n": len(rows),
                                    "n_responses": len({r["response"] for r in rows}),
                                    "n_reviewers": len({r["reviewer"] for r in rows}),
                                    "agreement": _alpha(rows, aspect)}
    return out


def human_eval_stats(store: Store, dataset: str | None = None, baseline: str | None = None, n_boot: int = 1000,
                     seed: int = 0, min_shared: int = 10) -> dict[str, Any]:
    """Every human-evaluation statistic of the store (of one ``dataset``, else all of it), as a JSON-able dict::

        {"dataset": str | None, "baseline": str | None,
         "versions": [str, ...],                        # every version with a rating or a comparison
         "counts": {"ratings", "rankings", "comparisons", "thumb_comparisons", "reviewers"},
         "settings": {"n_boot", "seed", "alpha": 0.05, "min_shared", "likert_clusters": "response"},
         "likert": {version: {aspect: {"mean", "ci_95": [lo, hi], "n", "n_responses", "n_reviewers",
                                       "agreement": {"krippendorff_alpha", "n_units"}}}},
                     # aspects: fluency, coherence, relevance, appropriateness, overall (their mean)
         "agreement": {"rate": {aspect: {"krippendorff_alpha", "n_units"}},      # over all versions
                       "rank": {"pairwise", "n_pairs"}},
         "win_rates": [{"a", "b", "n", "wins_a", "wins_b", "ties", "win_rate_a", "tie_rate", "ci_95",
                        "agreement": {"pairwise", "n_pairs"}}, ...],              # a < b by name
         "bradley_terry": None | {"scale": 400, "base": 10, "init": 1000, "baseline", "l2", "n_boot",
                                  "n_battles", "connected",
                                  "ratings": [{"version", "rating", "ci_95", "n", "wins", "losses", "ties"}]},
         "reviewers": [{"reviewer", "rank_agreement": {"score", "n_shared"},
                        "rating_correlation": {"score", "n_shared"}, "flagged", "reasons": [str]}],
         "flagged_reviewers": [str, ...]}

    Undefined figures (no data, no variation) are None. ``baseline`` names the version the
    Bradley–Terry ratings anchor at 1000 (default: the mean rating is 1000); a baseline in no
    comparison is an error naming the versions that are. Likert intervals resample responses
    (clusters); win-rate intervals are Wilson intervals with ties half; rating intervals resample
    battles, as Chatbot Arena does."""
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ChatforgeError(f"n_boot must be a whole number of at least 1, got {n_boot!r}")
    ratings, comparisons, judged, counts = _read(store, dataset)
    versions = sorted({r["version"] for r in ratings} | {c.a for c in comparisons} | {c.b for c in comparisons})
    if baseline is not None and baseline not in {c.a for c in comparisons} | {c.b for c in comparisons}:
        where = f"dataset {dataset!r}" if dataset else store.safe_url
        raise ChatforgeError(f"baseline {baseline!r} is in no comparison in {where}; the compared versions are: "
                             f"{', '.join(sorted({c.a for c in comparisons} | {c.b for c in comparisons})) or 'none'}")
    # agreement from every ranked pair and from the thumbs comparisons (the only ties the store records)
    judged = judged + [c for c in comparisons if c.source != "ranking"]
    reviewer_rows = reviewer_outliers(
        judged, [(r["reviewer"], r["response"], sum(r[a] for a in RATING_ASPECTS) / len(RATING_ASPECTS))
                      for r in ratings], min_shared=min_shared)
    agree, total = pair_agreement(judged)
    rows_all = [{**r, OVERALL: sum(r[a] for a in RATING_ASPECTS) / len(RATING_ASPECTS)} for r in ratings]
    return {
        "dataset": dataset, "baseline": baseline, "versions": versions,
        "counts": {**counts, "reviewers": len({r["reviewer"] for r in ratings} | {c.reviewer for c in comparisons})},
        "settings": {"n_boot": n_boot, "seed": seed, "alpha": 0.05, "min_shared": min_shared,
                     "likert_clusters": "response"},
        "likert": _likert(ratings, n_boot, seed),
        "agreement": {"rate": {a: _alpha(rows_all, a) for a in (*RATING_ASPECTS, OVERALL)} if ratings else {},
                      "rank": {"pairwise": agree / total if total else None, "n_pairs": total}},
        "win_rates": win_rates(comparisons),
        "bradley_terry": bootstrap_bradley_terry(comparisons, baseline, n_boot=n_boot, seed=seed)
        if comparisons else None,
        "reviewers": reviewer_rows,
        "flagged_reviewers": [r["reviewer"] for r in reviewer_rows if r["flagged"]],
    }
