"""The TF-IDF + logistic-regression baseline: fitted on the training split, C picked on validation,
and a clear note instead of a failure when scikit-learn is missing."""

from __future__ import annotations

import random
import sys

import pytest

from chatforge.eval.baselines import MISSING, tfidf_logreg
from chatforge.stages import get_stage


def rows(n: int, seed: int, noise: float = 0.0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    words = {"positive": ["great", "lovely", "perfect"], "negative": ["awful", "broken", "late"],
             "neutral": ["okay", "fine", "average"]}
    out = []
    for _ in range(n):
        label = rng.choice(sorted(words))
        shown = rng.choice(sorted(words)) if rng.random() < noise else label
        out.append((f"the parcel was {rng.choice(words[shown])} and arrived", label))
    return out


def test_fits_train_picks_c_on_val_and_scores_test():
    pytest.importorskip("sklearn")
    r = tfidf_logreg(rows(120, 0), rows(60, 2), rows(60, 1), labels=["negative", "neutral", "positive"])
    assert r["available"] and r["accuracy"] == r["macro_f1"] == 1.0 and r["C"] in (1.0, 10.0)
    # labels flipped at random in a quarter of the texts: the baseline cannot be perfect, but beats chance
    noisy = tfidf_logreg(rows(300, 0, noise=0.25), rows(200, 2, noise=0.25))
    assert 0.5 < noisy["accuracy"] < 1.0 and noisy["val_macro_f1"] is None and noisy["C"] == 1.0


def test_without_scikit_learn_the_report_says_so(monkeypatch):
    for name in [m for m in sys.modules if m == "sklearn" or m.startswith("sklearn.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "sklearn", None)  # import sklearn now raises ImportError
    r = tfidf_logreg(rows(10, 0), rows(10, 1))
    assert r == {"available": False, "reason": MISSING}
    ev = {"metrics": {"test_accuracy": 0.8, "test_macro_f1": 0.7, "majority_baseline": 0.4},
          "details": {"tfidf_logreg": r}, "train": {}, "wall_time_s": 1.0}
    line = get_stage("sentiment").summary(ev)
    assert "majority-class baseline 0.400; TF-IDF + logistic regression: scikit-learn is not installed" in line
