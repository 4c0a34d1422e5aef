"""Human-evaluation statistics: Likert means, win rates, Bradley–Terry ratings, reviewer outliers.

Pure numpy (no torch, no database): ``chatforge.store.stats.human_eval_stats`` reads the
feedback store and hands its judgements to these functions.

- ``bootstrap_mean``: percentile bootstrap of a mean. With ``clusters`` (e.g. the response
  each rating is of) whole clusters are resampled: several reviewers' ratings of one response
  share that response's quality, so resampling single ratings would treat correlated
  judgements as independent and give intervals that are too narrow (the tests show it).
- ``wilson``: the Wilson score interval of a proportion (ties may count half a win).
- ``win_rates``: for each pair of versions, wins, losses, ties and the win rate with ties half.
- ``bradley_terry`` / ``bootstrap_bradley_terry``: ratings as Chatbot Arena computes them
  (FastChat's ``compute_mle_elo``): a logistic model P(a beats b) = 1 / (1 + 10^((R_b - R_a)/400)),
  fitted by maximum likelihood; a tie is duplicated into one win for each side (so it weighs
  as two games split evenly); ratings = 1000 + 400·β, shifted so the baseline sits at 1000;
  bootstrap intervals resample battles with replacement and refit. The fit is Newton's method
  on the counts of each distinct battle (the sufficient statistics; a resample of battles is a
  multinomial draw of those counts, so all refits are solved together) with a weak L2 prior (``l2``, on natural-log
  strengths): Arena uses none, but without one a version that won every game, or a group of
  versions never compared with the rest, has no finite maximum; with it such ratings stay
  finite and the prior's pull on well-measured versions is negligible.
- ``reviewer_outliers``: reviewers whose agreement with the others lies far below the rest.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from chatforge.errors import ChatforgeError

SCALE, BASE, INIT = 400.0, 10.0, 1000.0
DRAWS_PER_BLOCK = 1 << 21  # bootstrap indices drawn at once (16 MiB)
BOOT_BLOCK = 256  # bootstrap refits solved together
MAD_TO_SD = 1.4826  # the MAD of a normal sample times this estimates its standard deviation


class HumanEvalError(ChatforgeError, ValueError):
    """Judgements or settings given to a human-evaluation statistic are unusable."""


def finite_or_none(x: float | None) -> float | None:
    """A JSON-able float: NaN and infinities (undefined statistics) become None."""
    if x is None or not math.isfinite(float(x)):
        return None
    return float(x)


# --------------------------------------------------------------------------- intervals


def wilson(wins: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``wins / n`` (``wins`` may hold half wins for
    ties: a tie's score varies less than a win's, so the interval is then slightly conservative)."""
    if n == 0:
        return 0.0, 1.0
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(max(0.0, p * (1 - p)) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def bootstrap_mean(values: Sequence[float], n_boot: int = 2000, alpha: float = 0.05, seed: int = 0,
                   clusters: Sequence[Hashable] | None = None) -> tuple[float, float, float]:
    """(mean, lo, hi): the mean of ``values`` and its ``1 - alpha`` percentile bootstrap interval.

    ``clusters`` (one key per value) resamples whole clusters with replacement and takes the
    mean of the values in the resample (the ratio of the summed values to the summed counts),
    which keeps correlated judgements of one unit together (module docstring)."""
    x = np.asarray(values, dtype=float)
    if x.ndim != 1 or x.size == 0:
        raise HumanEvalError("bootstrap_mean: need a non-empty list of numbers")
    if not np.isfinite(x).all():
        raise HumanEvalError("bootstrap_mean: the values must be finite numbers")
    if not 0 < alpha < 1:
        raise HumanEvalError(f"bootstrap_mean: alpha must lie in (0, 1), got {alpha}")
    if n_boot < 1:
        raise HumanEvalError(f"bootstrap_mean: n_boot must be at least 1, got {n_boot}")
    rng = np.random.default_rng(seed)
    if clusters is None:
        sums, counts = x, np.ones_like(x)
    else:
        if len(clusters) != x.size:
            raise HumanEvalError(f"bootstrap_mean: {x.size} values but {len(clusters)} cluster keys")
        index: dict[Hashable, int] = {}
        ids = np.array([index.setdefault(c, len(index)) for c in clusters])
        sums, counts = np.bincount(ids, weights=x), np.bincount(ids).astype(float)
    boot = np.empty(n_boot)
    per_block = max(1, DRAWS_PER_BLOCK // sums.size)  # bounded memory however many clusters there are
    for start in range(0, n_boot, per_block):
        draws = rng.integers(0, sums.size, size=(min(per_block, n_boot - start), sums.size))
        boot[start:start + len(draws)] = sums[draws].sum(axis=1) / counts[draws].sum(axis=1)
    lo, hi = np.quantile(boot, [alpha / 2, 1 - alpha / 2])
    return float(x.mean()), float(lo), float(hi)


# --------------------------------------------------------------------------- comparisons


@dataclass(frozen=True)
class Comparison:
    """One reviewer's judgement of one pair: ``score`` is a's (1 a won, 0.5 tie, 0 b won).
    ``unit`` names what was judged (e.g. the ranking's prompt and the two response ids), so
    judgements of the same pair by different reviewers can be compared for agreement."""

    a: str
    b: str
    score: float
    reviewer: str
    unit: Hashable
    source: str = "ranking"


def _judgements_by_unit(comparisons: Sequence[Comparison]) -> dict[Hashable, dict[str, float]]:
    """``(unit, (a, b)) -> {reviewer: a's score}``, oriented by sorted names so that a unit judged
    as (a, b) and as (b, a) lines up (a reviewer judging a unit twice: the later judgement)."""
    by_unit: dict[Hashable, dict[str, float]] = defaultdict(dict)
    for c in comparisons:
        key = (c.a, c.b) if c.a <= c.b else (c.b, c.a)
        by_unit[(c.unit, key)][c.reviewer] = c.score if c.a <= c.b else 1.0 - c.score
    return by_unit


def pair_agreement(comparisons: Sequence[Comparison]) -> tuple[int, int]:
    """(agreeing, total) reviewer pairs over the units judged by two or more reviewers: two
    judgements agree when they give the same outcome (the same winner, or both a tie)."""
    agree = total = 0
    for scores in _judgements_by_unit(comparisons).values():
        vals = list(scores.values())
        for i in range(len(vals)):
            for j in range(i + 1, len(vals)):
                agree += int(vals[i] == vals[j])
                total += 1
    return agree, total


def win_rates(comparisons: Sequence[Comparison]) -> list[dict[str, Any]]:
    """Per pair of versions (``a`` < ``b`` by name): n, wins of each, ties, ``win_rate_a``
    (ties half), ``tie_rate``, its 95% Wilson interval and the reviewers' agreement on the units
    of that pair judged by two or more of them."""
    groups: dict[tuple[str, str], list[Comparison]] = defaultdict(list)
    for c in comparisons:
        if c.score not in (0.0, 0.5, 1.0):
            raise HumanEvalError(f"win_rates: a comparison's score must be 1, 0.5 or 0, got {c.score!r}")
        if c.a == c.b:
            continue
        groups[(c.a, c.b) if c.a < c.b else (c.b, c.a)].append(c)
    out = []
    for (a, b), cs in sorted(groups.items()):
        scores = [c.score if c.a == a else 1.0 - c.score for c in cs]
        wins_a = sum(1 for s in scores if s == 1.0)
        wins_b = sum(1 for s in scores if s == 0.0)
        ties = len(scores) - wins_a - wins_b
        n = len(scores)
        lo, hi = wilson(wins_a + ties / 2, n)
        agree, total = pair_agreement(cs)
        out.append({"a": a, "b": b, "n": n, "wins_a": wins_a, "wins_b": wins_b, "ties": ties,
                    "win_rate_a": (wins_a + ties / 2) / n, "tie_rate": ties / n, "ci_95": [lo, hi],
                    "agreement": {"pairwise": agree / total if total else None, "n_pairs": total}})
    return out


# --------------------------------------------------------------------------- Bradley–Terry


def _battle_arrays(comparisons: Sequence[Comparison], players: list[str]) -> tuple[np.ndarray, np.ndarray,
                                                                                    np.ndarray]:
    index = {p: i for i, p in enumerate(players)}
    keep = [c for c in comparisons if c.a != c.b]
    i = np.array([index[c.a] for c in keep], dtype=int)
    j = np.array([index[c.b] for c in keep], dtype=int)
    y = np.array([c.score for c in keep], dtype=float)
    bad = ~np.isin(y, (0.0, 0.5, 1.0))
    if bad.any():
        raise HumanEvalError(f"bradley_terry: a comparison's score must be 1, 0.5 or 0, got {y[bad][0]}")
    return i, j, y


def _cells(i: np.ndarray, j: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct battles (i, j, score) and how often each occurred: the likelihood depends on the
    battles only through these counts, and a bootstrap resample of battles is a multinomial draw of them."""
    cells, counts = np.unique(np.stack([i, j, (2 * y).astype(int)], axis=1), axis=0, return_counts=True)
    return cells[:, 0], cells[:, 1], cells[:, 2] / 2.0, counts.astype(float)


def _fit(k: int, ci: np.ndarray, cj: np.ndarray, cy: np.ndarray, counts: np.ndarray, l2: float,
         iters: int = 100, tol: float = 1e-8) -> np.ndarray:
    """Natural-log strengths t maximising sum games [wins log s(t_i - t_j) + losses log s(t_j - t_i)]
    - l2/2 |t|^2 by Newton's method, for every row of ``counts`` (B x cells) at once: a tie is
    Arena's two rows, one won by each side (two games, one win). Returns B x k."""
    counts = np.atleast_2d(counts)
    games = counts * np.where(cy == 0.5, 2.0, 1.0)
    won = counts * np.where(cy == 0.5, 1.0, cy)
    incidence = np.zeros((ci.size, k))  # +1 for the first side of a cell, -1 for the second
    incidence[np.arange(ci.size), ci] = 1.0
    incidence[np.arange(ci.size), cj] = -1.0
    theta = np.zeros((counts.shape[0], k))
    eye = l2 * np.eye(k)  # the prior makes minus the Hessian positive definite: one maximum
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(theta @ incidence.T)))
        grad = (won - games * p) @ incidence - l2 * theta
        # minus the Hessian: the comparisons' weighted graph Laplacian, plus the prior
        hess = np.einsum("bc,ck,cl->bkl", games * p * (1.0 - p), incidence, incidence) + eye
        # at most 2 (about 350 rating points) a step: from the start, an unbeaten version's Newton steps
        # would overshoot far past the prior's optimum before coming back
        step = np.clip(np.linalg.solve(hess, grad[..., None])[..., 0], -2.0, 2.0)
        theta += step
        if np.abs(step).max() < tol:
            break
    return theta


def _ratings(theta: np.ndarray, players: list[str], baseline: str | None) -> np.ndarray:
    """Elo-scale ratings from (rows of) natural-log strengths, anchored."""
    r = INIT + SCALE * theta / math.log(BASE)
    if baseline is None:
        return r - r.mean(axis=-1, keepdims=True) + INIT  # no baseline: the mean version sits at 1000
    return r - r[..., players.index(baseline), None] + INIT


def _players(comparisons: Sequence[Comparison], baseline: str | None) -> list[str]:
    players = sorted({c.a for c in comparisons} | {c.b for c in comparisons})
    if not players:
        raise HumanEvalError("bradley_terry: no comparisons between two different versions")
    if baseline is not None and baseline not in players:
        raise HumanEvalError(f"bradley_terry: the baseline {baseline!r} is in no comparison; the versions "
                             f"compared are {', '.join(players)}")
    return players


def bradley_terry(comparisons: Sequence[Comparison], baseline: str | None = None, l2: float = 0.01
                  ) -> dict[str, float]:
    """``version -> rating``: Arena's Bradley–Terry ratings (module docstring), the baseline at 1000
    (no baseline: the mean rating is 1000)."""
    players = _players(comparisons, baseline)
    i, j, y = _battle_arrays(comparisons, players)
    ci, cj, cy, counts = _cells(i, j, y)
    theta = _fit(len(players), ci, cj, cy, counts, l2)[0]
    return dict(zip(players, (float(r) for r in _ratings(theta, players, baseline))))


def _connected(players: list[str], i: np.ndarray, j: np.ndarray) -> bool:
    parent = list(range(len(players)))

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for a, b in zip(i.tolist(), j.tolist()):
        parent[root(a)] = root(b)
    return len({root(x) for x in range(len(players))}) == 1


def bootstrap_bradley_terry(comparisons: Sequence[Comparison], baseline: str | None = None, n_boot: int = 1000,
                            alpha: float = 0.05, seed: int = 0, l2: float = 0.01) -> dict[str, Any]:
    """Ratings with ``1 - alpha`` percentile intervals from ``n_boot`` refits on battles resampled
    with replacement (each refit anchored the same way, so the baseline's interval is [1000, 1000]).

    Returns ``{"scale", "base", "init", "baseline", "l2", "n_boot", "n_battles", "connected",
    "ratings": [{"version", "rating", "ci_95", "n", "wins", "losses", "ties"}, ...]}``, best first.
    ``connected`` is False when some versions were never compared, directly or through others,
    with the rest: their ratings relative to the others then come from the prior alone."""
    players = _players(comparisons, baseline)
    k = len(players)
    i, j, y = _battle_arrays(comparisons, players)
    ci, cj, cy, counts = _cells(i, j, y)
    point = _ratings(_fit(k, ci, cj, cy, counts, l2)[0], players, baseline)
    rng = np.random.default_rng(seed)
    boots = np.empty((n_boot, k))
    for start in range(0, n_boot, BOOT_BLOCK):  # resampled battles, refitted a block at a time
        draws = rng.multinomial(y.size, counts / y.size, size=min(BOOT_BLOCK, n_boot - start))
        boots[start:start + len(draws)] = _ratings(_fit(k, ci, cj, cy, draws.astype(float), l2), players, baseline)
    lo, hi = np.quantile(boots, [alpha / 2, 1 - alpha / 2], axis=0)
    rows = []
    for p in range(k):
        as_a, as_b = y[i == p], y[j == p]
        wins = int((as_a == 1).sum() + (as_b == 0).sum())
        losses = int((as_a == 0).sum() + (as_b == 1).sum())
        ties = int((as_a == 0.5).sum() + (as_b == 0.5).sum())
        rows.append({"version": players[p], "rating": float(point[p]), "ci_95": [float(lo[p]), float(hi[p])],
                     "n": wins + losses + ties, "wins": wins, "losses": losses, "ties": ties})
    rows.sort(key=lambda r: -r["rating"])
    return {"scale": SCALE, "base": BASE, "init": INIT, "baseline": baseline, "l2": l2, "n_boot": n_boot,
            "n_battles": int(y.size), "connected": _connected(players, i, j), "ratings": rows}


# --------------------------------------------------------------------------- reviewers


def rank_agreement_by_reviewer(comparisons: Sequence[Comparison]) -> dict[str, tuple[float | None, int]]:
    """``reviewer -> (share of their judgements that agree with another reviewer's judgement of the
    same unit, how many such judgement pairs)``."""
    agree: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for scores in _judgements_by_unit(comparisons).values():
        for r, s in scores.items():
            for other, t in scores.items():
                if other != r:
                    agree[r] += int(s == t)
                    total[r] += 1
    reviewers = {c.reviewer for c in comparisons}
    return {r: (agree[r] / total[r] if total[r] else None, total[r]) for r in sorted(reviewers)}


def rating_correlation_by_reviewer(ratings: Sequence[tuple[str, Hashable, float]]
                                   ) -> dict[str, tuple[float | None, int]]:
    """``reviewer -> (Pearson correlation of their scores with the mean of the other reviewers'
    scores of the same units, how many shared units)`` from ``(reviewer, unit, score)`` rows.
    None when undefined (fewer than 3 shared units, or no variation on either side)."""
    by_unit: dict[Hashable, dict[str, float]] = defaultdict(dict)
    for reviewer, unit, score in ratings:
        by_unit[unit][reviewer] = float(score)
    pairs: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for scores in by_unit.values():
        if len(scores) < 2:
            continue
        total = sum(scores.values())
        for r, s in scores.items():
            pairs[r].append((s, (total - s) / (len(scores) - 1)))  # leave-one-out mean of the others
    out: dict[str, tuple[float | None, int]] = {}
    for r in sorted({row[0] for row in ratings}):
        xy = np.array(pairs.get(r, []), dtype=float).reshape(-1, 2)
        corr = None
        if len(xy) >= 3 and xy[:, 0].std() > 0 and xy[:, 1].std() > 0:
            corr = float(np.corrcoef(xy[:, 0], xy[:, 1])[0, 1])
        out[r] = (corr, len(xy))
    return out


def outliers(scores: dict[str, tuple[float | None, int]], min_shared: int = 10, k: float = 2.0,
             min_gap: float = 0.1) -> dict[str, dict[str, Any]]:
    """Which reviewers' agreement lies far below the others': below the median of the eligible
    reviewers (those with at least ``min_shared`` shared units and a defined score) by more than
    ``k`` robust standard deviations (1.4826 MAD) and by at least ``min_gap`` (so that a team that
    agrees almost perfectly does not flag whoever is a hair below). Needs 3 eligible reviewers:
    with two, neither can be told from the other. Returns ``reviewer -> {"flagged", "threshold",
    "median"}`` for the eligible ones."""
    eligible = {r: s for r, (s, n) in scores.items() if s is not None and n >= min_shared}
    if len(eligible) < 3:
        return {}
    vals = np.array(list(eligible.values()))
    median = float(np.median(vals))
    spread = MAD_TO_SD * float(np.median(np.abs(vals - median)))
    threshold = median - max(k * spread, min_gap)
    return {r: {"flagged": s < threshold, "threshold": threshold, "median": median} for r, s in eligible.items()}


def reviewer_outliers(comparisons: Sequence[Comparison], ratings: Sequence[tuple[str, Hashable, float]],
                      min_shared: int = 10, k: float = 2.0, min_gap: float = 0.1) -> list[dict[str, Any]]:
    """Per reviewer: their agreement with the others on shared ranking pairs and the correlation of
    their ratings with the others' on shared responses, each with how many units it rests on, and
    ``flagged`` with the ``reasons`` (see ``outliers`` for the rule)."""
    rank = rank_agreement_by_reviewer(comparisons)
    rate = rating_correlation_by_reviewer(ratings)
    rank_flags = outliers(rank, min_shared, k, min_gap)
    rate_flags = outliers(rate, min_shared, k, min_gap)
    out = []
    for r in sorted(set(rank) | set(rate)):
        reasons = []
        if rank_flags.get(r, {}).get("flagged"):
            f, (s, n) = rank_flags[r], rank[r]
            reasons.append(f"agrees with other reviewers on {s:.0%} of {n} shared ranking pairs; the median "
                           f"reviewer agrees on {f['median']:.0%} (flagged below {f['threshold']:.0%})")
        if rate_flags.get(r, {}).get("flagged"):
            f, (s, n) = rate_flags[r], rate[r]
            reasons.append(f"ratings correlate {s:.2f} with the other reviewers' mean on {n} shared responses; "
                           f"the median reviewer's correlate {f['median']:.2f} (flagged below {f['threshold']:.2f})")
        rank_s, rank_n = rank.get(r, (None, 0))
        rate_s, rate_n = rate.get(r, (None, 0))
        out.append({"reviewer": r,
                    "rank_agreement": {"score": finite_or_none(rank_s), "n_shared": rank_n},
                    "rating_correlation": {"score": finite_or_none(rate_s), "n_shared": rate_n},
                    "flagged": bool(reasons), "reasons": reasons})
    return out


def human_eval_stats(store: Any, dataset: str | None = None, baseline: str | None = None,
                     **kwargs: Any) -> dict[str, Any]:
    """The feedback store's human-evaluation statistics: see ``chatforge.store.stats.human_eval_stats``
    (it lives in the store package, which reads the tables; this module stays database-free)."""
    from chatforge.store.stats import human_eval_stats as from_store

    return from_store(store, dataset=dataset, baseline=baseline, **kwargs)
