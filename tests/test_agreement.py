"""Agreement coefficients against published worked examples, plus edge cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from chatforge.errors import ChatforgeError
from chatforge.eval.agreement import (
    AgreementError,
    cohen_kappa,
    fleiss_kappa,
    fleiss_table,
    kendall_w,
    krippendorff_alpha,
    pairwise_agreement,
)

# Krippendorff (2011), "Computing Krippendorff's Alpha-Reliability", section C: 4 observers x 12
# units with missing values (also Krippendorff 2019, ch. 12). Published: nominal 0.743,
# ordinal 0.815, interval 0.849, ratio 0.797. Unit 12 has one value and is not pairable.
_ = None
KRIPPENDORFF_2011 = [  # one row per observer
    [1, 2, 3, 3, 2, 1, 4, 1, 2, _, _, _],
    [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, _, 3],
    [_, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, _],
    [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, _],
]
# Wikipedia "Krippendorff's alpha", computational example: 3 coders x 15 units;
# nominal 0.691 (0.691358 in the `krippendorff` package's tests), interval 0.811 (0.810845 there).
WIKIPEDIA_ALPHA = [
    [_, _, _, _, _, 3, 4, 1, 2, 1, 1, 3, 3, _, 3],
    [1, _, 2, 1, 3, 3, 4, 3, _, _, _, _, _, _, _],
    [_, _, 2, 1, 3, 4, 4, _, 2, 1, 1, 3, 3, _, 4],
]
# Fleiss (1971) as worked on Wikipedia ("Fleiss' kappa"): 10 subjects, 14 raters, 5 categories;
# P = 0.378, Pe = 0.213, kappa = 0.210.
FLEISS_WIKIPEDIA = [
    [0, 0, 0, 0, 14],
    [0, 2, 6, 4, 2],
    [0, 0, 3, 5, 6],
    [0, 3, 9, 2, 0],
    [2, 2, 8, 1, 1],
    [7, 7, 0, 0, 0],
    [3, 2, 6, 3, 0],
    [2, 5, 3, 2, 2],
    [6, 5, 2, 1, 0],
    [0, 2, 2, 3, 7],
]


def units_of(rows):
    return [list(u) for u in zip(*rows)]


def pairs_table(yy: int, yn: int, ny: int, nn: int) -> tuple[list[str], list[str]]:
    """Two raters' labels from a 2x2 agreement table (rater A in rows, B in columns)."""
    a = ["yes"] * (yy + yn) + ["no"] * (ny + nn)
    b = ["yes"] * yy + ["no"] * yn + ["yes"] * ny + ["no"] * nn
    return a, b


# --------------------------------------------------------------------------- Cohen


@pytest.mark.parametrize("table,expected", [
    ((20, 5, 10, 15), 0.4),  # Wikipedia "Cohen's kappa": 50 grant proposals, p_o = 0.7, p_e = 0.5
    ((45, 15, 25, 15), 0.1304),  # Wikipedia, "same percentages but different numbers"
    ((25, 35, 5, 35), 0.2593),
])
def test_cohen_kappa_wikipedia_examples(table, expected):
    a, b = pairs_table(*table)
    assert cohen_kappa(a, b) == pytest.approx(expected, abs=1e-4)


def test_cohen_kappa_scikit_learn_cases():
    # the values scikit-learn's test suite checks cohen_kappa_score against
    y1 = [0] * 40 + [1] * 60
    y2 = [0] * 20 + [1] * 20 + [0] * 10 + [1] * 50
    assert cohen_kappa(y1, y2) == pytest.approx(0.348, abs=1e-3)
    assert cohen_kappa(y1, y2) == pytest.approx(cohen_kappa(y2, y1))  # symmetric
    y1 = [0] * 46 + [1] * 44 + [2] * 10  # Artstein & Poesio (2008), table 4
    y2 = [0] * 52 + [1] * 32 + [2] * 16
    assert cohen_kappa(y1, y2) == pytest.approx(0.8013, abs=1e-4)
    y2 = [0] * 50 + [1] * 40 + [2] * 10
    assert cohen_kappa(y1, y2) == pytest.approx(0.9315, abs=1e-4)
    assert cohen_kappa(y1, y2, weights="linear") == pytest.approx(0.9412, abs=1e-4)
    assert cohen_kappa(y1, y2, weights="quadratic") == pytest.approx(0.9541, abs=1e-4)


def test_cohen_kappa_edges():
    assert cohen_kappa(["a", "b", "c", "a"], ["a", "b", "c", "a"]) == 1.0
    # complete disagreement between two balanced raters is worse than chance
    assert cohen_kappa([0, 1, 0, 1], [1, 0, 1, 0]) == pytest.approx(-1.0)
    # both raters always say the same single label: p_e = 1, kappa undefined
    assert math.isnan(cohen_kappa(["x"] * 5, ["x"] * 5))
    with pytest.raises(AgreementError, match="different numbers"):
        cohen_kappa([1, 2], [1])
    with pytest.raises(AgreementError, match="missing"):
        cohen_kappa([1, None], [1, 2])
    with pytest.raises(AgreementError, match="weights"):
        cohen_kappa([1, 2], [1, 2], weights="cubic")
    with pytest.raises(AgreementError, match="not one of the labels"):
        cohen_kappa([1, 3], [1, 2], labels=[1, 2])
    with pytest.raises(AgreementError, match="no units") as e:
        cohen_kappa([], [])
    assert isinstance(e.value, ValueError) and isinstance(e.value, ChatforgeError)


# --------------------------------------------------------------------------- Fleiss


def test_fleiss_kappa_fleiss_1971_worked_example():
    assert fleiss_kappa(FLEISS_WIKIPEDIA) == pytest.approx(0.210, abs=5e-4)
    assert fleiss_kappa(np.array(FLEISS_WIKIPEDIA)) == pytest.approx(0.20993, abs=1e-5)


def test_fleiss_kappa_from_unit_lists_matches_table():
    cats = ["c1", "c2", "c3", "c4", "c5"]
    units = [[c for c, n in zip(cats, row) for _ in range(n)] for row in FLEISS_WIKIPEDIA]
    table, found = fleiss_table(units, cats)
    assert found == cats and table.tolist() == FLEISS_WIKIPEDIA
    assert fleiss_kappa(units=units) == pytest.approx(fleiss_kappa(FLEISS_WIKIPEDIA))


def test_fleiss_kappa_edges():
    assert fleiss_kappa(units=[["a", "a", "a"], ["b", "b", "b"], ["a", "a", "a"]]) == 1.0
    assert math.isnan(fleiss_kappa(units=[["a", "a"], ["a", "a"]]))  # no variation: undefined
    with pytest.raises(AgreementError, match="same number of raters"):
        fleiss_kappa(units=[["a", "a"], ["a", "b", "b"]])
    with pytest.raises(AgreementError, match="at least 2"):
        fleiss_kappa([[1, 0], [0, 1]])
    with pytest.raises(AgreementError, match="either"):
        fleiss_kappa(FLEISS_WIKIPEDIA, units=[["a", "a"]])
    with pytest.raises(AgreementError, match="whole counts"):
        fleiss_kappa([[1.5, 0.5], [1, 1]])


# --------------------------------------------------------------------------- Krippendorff


@pytest.mark.parametrize("level,expected", [
    ("nominal", 0.743), ("ordinal", 0.815), ("interval", 0.849), ("ratio", 0.797)])
def test_krippendorff_alpha_2011_example(level, expected):
    assert krippendorff_alpha(units_of(KRIPPENDORFF_2011), level) == pytest.approx(expected, abs=5e-4)


@pytest.mark.parametrize("level,expected", [("nominal", 0.691358), ("interval", 0.810845)])
def test_krippendorff_alpha_wikipedia_example(level, expected):
    assert krippendorff_alpha(units_of(WIKIPEDIA_ALPHA), level) == pytest.approx(expected, abs=1e-6)


def test_krippendorff_alpha_missing_values_and_lone_units():
    units = units_of(KRIPPENDORFF_2011)
    base = krippendorff_alpha(units, "interval")
    # NaN counts as missing like None; units with < 2 values (or none) are dropped
    with_nan = [[float("nan") if v is None else v for v in u] for u in units]
    assert krippendorff_alpha(with_nan, "interval") == pytest.approx(base)
    assert krippendorff_alpha([*units, [4], [], [None, None]], "interval") == pytest.approx(base)
    # dropping unit 12 (one value) explicitly changes nothing either
    assert krippendorff_alpha(units[:11], "interval") == pytest.approx(base)


def test_krippendorff_alpha_edges():
    perfect = [[1, 1, 1], [2, 2], [3, 3, 3], [5, 5]]
    for level in ("nominal", "ordinal", "interval", "ratio"):
        assert krippendorff_alpha(perfect, level) == 1.0
    assert krippendorff_alpha([["pos", "pos"], ["neg", "neg", None]], "nominal") == 1.0
    assert math.isnan(krippendorff_alpha([[3, 3], [3, 3]], "interval"))  # no variation at all
    # systematic disagreement is below zero
    assert krippendorff_alpha([[1, 5], [5, 1], [1, 5], [5, 1]], "interval") < 0
    with pytest.raises(AgreementError, match="at least 2 raters"):
        krippendorff_alpha([[1, None], [2]], "nominal")
    with pytest.raises(AgreementError, match="must be numbers"):
        krippendorff_alpha([["a", "b"]], "interval")
    with pytest.raises(AgreementError, match="level"):
        krippendorff_alpha([[1, 2]], "fuzzy")


def test_krippendorff_alpha_nominal_two_raters_is_corrected_scotts_pi():
    # two raters, no missing data: alpha = 1 - (2N - 1) / (2N) * (1 - pi), Scott's pi with a
    # small-sample correction (Krippendorff 2011). Table 20/5/10/15: p_o = 0.7, pooled shares
    # of yes = 55/100 and no = 45/100, so p_e = 0.55^2 + 0.45^2 = 0.505.
    a, b = pairs_table(20, 5, 10, 15)
    pi = (0.7 - 0.505) / (1 - 0.505)
    expected = 1 - (99 / 100) * (1 - pi)
    assert krippendorff_alpha([[x, y] for x, y in zip(a, b)], "nominal") == pytest.approx(expected, abs=1e-12)


# --------------------------------------------------------------------------- rankings


def test_kendall_w():
    assert kendall_w([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]]) == 1.0
    assert kendall_w([[1, 2, 3], [3, 2, 1]]) == 0.0
    # rank sums 4, 6, 8 (mean 6): S = 8; W = 12 * 8 / (3^2 * (3^3 - 3)) = 96 / 216
    assert kendall_w([[1, 2, 3], [1, 3, 2], [2, 1, 3]]) == pytest.approx(96 / 216)
    with pytest.raises(AgreementError, match="without ties"):
        kendall_w([[1, 1, 3], [1, 2, 3]])
    with pytest.raises(AgreementError, match="at least 2 raters"):
        kendall_w([[1, 2, 3]])


def test_pairwise_agreement():
    # pairs (a,b) and (a,c) ordered alike, (b,c) flipped
    assert pairwise_agreement([["a", "b", "c"], ["a", "c", "b"]]) == (2, 3)
    assert pairwise_agreement([[1, 2], [1, 2], [2, 1]]) == (1, 3)
    # only items both raters ranked are compared
    assert pairwise_agreement([[1, 2, 3], [2, 1]]) == (0, 1)
