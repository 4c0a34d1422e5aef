"""Inter-rater agreement: Cohen's kappa, Fleiss' kappa, Krippendorff's alpha, Kendall's W.

Human feedback is only worth training on if people agree about it. These are the
standard chance-corrected agreement coefficients, written out with numpy so each
formula can be read next to its paper:

- ``cohen_kappa(a, b)``: two raters, the same units (Cohen 1960; optional linear or
  quadratic weights for ordered categories, Cohen 1968).
- ``fleiss_kappa(table)``: any fixed number of raters per unit (Fleiss 1971).
- ``krippendorff_alpha(units, level)``: any number of raters, missing values,
  nominal/ordinal/interval/ratio data (Krippendorff 2011, "Computing Krippendorff's
  Alpha-Reliability"). Units with fewer than two values carry no information about
  agreement and are dropped.
- ``kendall_w(ranks)``: concordance of m complete rankings of the same n items.

All return 1.0 for perfect agreement, about 0 for chance-level agreement, and NaN
where the coefficient is undefined (e.g. every rating is the same value, so there is
no variation to agree about). Bad input raises ``AgreementError`` (a ``ValueError``
and a ``ChatforgeError``) saying what is wrong.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np

from chatforge.errors import ChatforgeError

LEVELS = ("nominal", "ordinal", "interval", "ratio")


class AgreementError(ChatforgeError, ValueError):
    """The ratings given to an agreement coefficient are malformed."""


def _is_missing(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _safe_ratio(num: float, den: float) -> float:
    """``num / den`` where 0/0 (no variation at all) is undefined: NaN, never a warning."""
    if den == 0:
        return float("nan")
    return num / den


# --------------------------------------------------------------------------- Cohen


def cohen_kappa(a: Sequence[Hashable], b: Sequence[Hashable], labels: Sequence[Hashable] | None = None,
                weights: str | None = None) -> float:
    """Cohen's kappa between rater ``a`` and rater ``b`` (same units, same order).

    kappa = (p_o - p_e) / (1 - p_e), with p_o the observed agreement and p_e the
    agreement expected from each rater's label frequencies. ``weights`` ("linear" or
    "quadratic") gives partial credit for near misses on ordered ``labels`` (which then
    fix the order; by default the sorted labels seen).
    """
    if len(a) != len(b):
        raise AgreementError(f"cohen_kappa: the raters rated different numbers of units ({len(a)} vs {len(b)})")
    if not len(a):
        raise AgreementError("cohen_kappa: no units rated")
    if any(_is_missing(x) for x in (*a, *b)):
        raise AgreementError("cohen_kappa: missing ratings are not allowed (use krippendorff_alpha for those)")
    cats = list(labels) if labels is not None else sorted(set(a) | set(b), key=_sort_key)
    index = {c: i for i, c in enumerate(cats)}
    unknown = [x for x in (*a, *b) if x not in index]
    if unknown:
        raise AgreementError(f"cohen_kappa: rating {unknown[0]!r} is not one of the labels {cats!r}")
    k = len(cats)
    confusion = np.zeros((k, k))
    for x, y in zip(a, b):
        confusion[index[x], index[y]] += 1
    confusion /= confusion.sum()
    expected = np.outer(confusion.sum(axis=1), confusion.sum(axis=0))
    grid = np.arange(k)
    if weights is None:
        w = (grid[:, None] != grid[None, :]).astype(float)  # disagreement weight: 0 on the diagonal, 1 off it
    elif weights == "linear":
        w = np.abs(grid[:, None] - grid[None, :]).astype(float)
    elif weights == "quadratic":
        w = ((grid[:, None] - grid[None, :]) ** 2).astype(float)
    else:
        raise AgreementError(f"cohen_kappa: weights must be None, 'linear' or 'quadratic', got {weights!r}")
    # 1 - observed disagreement / expected disagreement == (p_o - p_e) / (1 - p_e) when unweighted
    return 1.0 - _safe_ratio(float((w * confusion).sum()), float((w * expected).sum()))


def _sort_key(v: Any) -> tuple[str, Any]:
    # labels of mixed types (e.g. True and "yes") still sort deterministically
    return (type(v).__name__, v)


# --------------------------------------------------------------------------- Fleiss


def fleiss_table(units: Sequence[Sequence[Hashable]], categories: Sequence[Hashable] | None = None
                 ) -> tuple[np.ndarray, list[Hashable]]:
    """Per-unit category lists -> (N x k count table, categories)."""
    cats = list(categories) if categories is not None else sorted({c for u in units for c in u}, key=_sort_key)
    index = {c: i for i, c in enumerate(cats)}
    table = np.zeros((len(units), len(cats)))
    for i, unit in enumerate(units):
        for c in unit:
            if c not in index:
                raise AgreementError(f"fleiss_kappa: unit {i}: category {c!r} is not one of {cats!r}")
            table[i, index[c]] += 1
    return table, cats


def fleiss_kappa(table: Any = None, *, units: Sequence[Sequence[Hashable]] | None = None) -> float:
    """Fleiss' kappa from an N x k ``table`` of counts (row i: how many raters put unit i in
    each of k categories; every row sums to the same n >= 2), or from ``units``: one list of
    category labels per unit.

    kappa = (P - Pe) / (1 - Pe): P is the mean per-unit agreement, the share of rater
    pairs that agree; Pe the agreement expected from the overall category shares.
    """
    if (table is None) == (units is None):
        raise AgreementError("fleiss_kappa: give either a count table or units=, not both")
    if units is not None:
        table, _ = fleiss_table(units)
    t = np.asarray(table, dtype=float)
    if t.ndim != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise AgreementError(f"fleiss_kappa: the table must be units x categories, got shape {t.shape}")
    if (t < 0).any() or (t != np.round(t)).any():
        raise AgreementError("fleiss_kappa: the table must hold non-negative whole counts")
    n_per_unit = t.sum(axis=1)
    n = n_per_unit[0]
    if (n_per_unit != n).any():
        bad = int(np.argmax(n_per_unit != n))
        raise AgreementError(f"fleiss_kappa: every unit needs the same number of raters; unit 0 has {int(n)}, "
                             f"unit {bad} has {int(n_per_unit[bad])} (use krippendorff_alpha for unequal counts)")
    if n < 2:
        raise AgreementError("fleiss_kappa: each unit needs at least 2 ratings")
    p_unit = ((t * (t - 1)).sum(axis=1)) / (n * (n - 1))
    p_bar = float(p_unit.mean())
    shares = t.sum(axis=0) / t.sum()
    pe_bar = float((shares**2).sum())
    return _safe_ratio(p_bar - pe_bar, 1.0 - pe_bar)


# --------------------------------------------------------------------------- Krippendorff


def krippendorff_alpha(units: Sequence[Sequence[Any]], level: str = "nominal") -> float:
    """Krippendorff's alpha over ``units``: one list per unit of the values its raters gave
    (``None``/NaN for a rater who did not rate it; such entries are ignored).

    alpha = 1 - D_o / D_e, from the coincidence matrix o (every ordered pair of values
    within a unit, weighted 1/(m_u - 1)): D_o = sum o_ck d2(c,k) / n and
    D_e = sum n_c n_k d2(c,k) / (n (n - 1)), with the squared difference d2 of ``level``:
    nominal (c != k), ordinal (ranks by how many values lie between c and k),
    interval ((c - k)^2) or ratio (((c - k) / (c + k))^2).
    """
    if level not in LEVELS:
        raise AgreementError(f"krippendorff_alpha: level must be one of {', '.join(LEVELS)}, got {level!r}")
    pairable = [[v for v in u if not _is_missing(v)] for u in units]
    pairable = [u for u in pairable if len(u) >= 2]  # a lone value has nothing to agree with
    if not pairable:
        raise AgreementError("krippendorff_alpha: no unit has values from at least 2 raters")
    values = sorted({v for u in pairable for v in u}, key=_sort_key)
    if level != "nominal":
        bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int | float)]
        if bad:
            raise AgreementError(f"krippendorff_alpha: {level} data must be numbers, got {bad[0]!r}")
    index = {v: i for i, v in enumerate(values)}
    k = len(values)

    # coincidence matrix: each unit contributes every ordered pair of its values, weighted 1/(m_u - 1)
    o = np.zeros((k, k))
    for u in pairable:
        counts = np.zeros(k)
        for v in u:
            counts[index[v]] += 1
        o += (np.outer(counts, counts) - np.diag(counts)) / (len(u) - 1)
    n_c = o.sum(axis=1)
    n = n_c.sum()

    d2 = _squared_difference(np.asarray(values, dtype=float) if level != "nominal" else None, n_c, level, k)
    observed = float((o * d2).sum())
    expected = float((np.outer(n_c, n_c) * d2).sum()) / (n - 1)
    return 1.0 - _safe_ratio(observed, expected)


def _squared_difference(v: np.ndarray | None, n_c: np.ndarray, level: str, k: int) -> np.ndarray:
    if level == "nominal":
        return 1.0 - np.eye(k)
    if level == "interval":
        return (v[:, None] - v[None, :]) ** 2
    if level == "ratio":
        total = v[:, None] + v[None, :]
        with np.errstate(divide="ignore", invalid="ignore"):
            d = np.where(total == 0, 0.0, (v[:, None] - v[None, :]) / total)
        return d**2
    # ordinal: the distance between ranks c < k is the number of pairable values from c to k,
    # counting the two end categories half: sum_{g=c..k} n_g - (n_c + n_k) / 2
    cum = np.concatenate([[0.0], np.cumsum(n_c)])
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    lo, hi = np.minimum(i, j), np.maximum(i, j)
    between = cum[hi + 1] - cum[lo]
    return (between - (n_c[lo] + n_c[hi]) / 2.0) ** 2


# --------------------------------------------------------------------------- rankings


def kendall_w(ranks: Any) -> float:
    """Kendall's coefficient of concordance W for an m x n array: m raters each ranking
    the same n items (row r: the rank rater r gave each item, 1 = best, no ties).

    W = 12 S / (m^2 (n^3 - n)), S the squared deviation of the items' rank sums from
    their mean: 1 when every rater gives the same order, 0 when the orders cancel out.
    """
    r = np.asarray(ranks, dtype=float)
    if r.ndim != 2 or r.shape[0] < 2 or r.shape[1] < 2:
        raise AgreementError(f"kendall_w: need at least 2 raters x 2 items, got shape {r.shape}")
    m, n = r.shape
    expected = np.arange(1, n + 1)
    for row in range(m):
        if not np.array_equal(np.sort(r[row]), expected):
            raise AgreementError(f"kendall_w: rater {row} did not rank the items 1..{n} without ties: {r[row]}")
    sums = r.sum(axis=0)
    s = float(((sums - sums.mean()) ** 2).sum())
    return 12.0 * s / (m**2 * (n**3 - n))


def pairwise_agreement(orders: Sequence[Sequence[Hashable]]) -> tuple[int, int]:
    """For several raters' orders of the same items (best first): over every pair of raters
    and every pair of items both ranked, how many times they put the pair the same way.
    Returns (agreeing comparisons, comparisons) so callers can pool over units."""
    agree = total = 0
    positions = [{item: p for p, item in enumerate(order)} for order in orders]
    for x in range(len(positions)):
        for y in range(x + 1, len(positions)):
            common = sorted(set(positions[x]) & set(positions[y]), key=_sort_key)
            for i in range(len(common)):
                for j in range(i + 1, len(common)):
                    a, b = common[i], common[j]
                    same = (positions[x][a] < positions[x][b]) == (positions[y][a] < positions[y][b])
                    agree += int(same)
                    total += 1
    return agree, total
