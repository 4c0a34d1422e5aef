"""Classical text-classification baseline: TF-IDF + logistic regression (scikit-learn).

What a practitioner compares a fine-tuned classifier against: TF-IDF features (sublinear
term frequency) into logistic regression (liblinear; one-vs-rest for more than two
labels), fitted on the same training split. The features (word uni- and bigrams, or
character 2-4-grams within word boundaries, which also serve languages written without
spaces) and the inverse regularisation strength ``C`` are chosen by macro-F1 on the
validation split (when there is one; else words and ``C`` = 1), as anyone tuning the
baseline would (stopping early once a setting is perfect on validation); the test split
is scored once. scikit-learn is an optional extra
(``pip install 'chatforge[baselines]'``); without it the result says so instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatforge.eval.metrics import classification_report

C_GRID = (1.0, 10.0)
FEATURES = {"word 1-2-grams": {"analyzer": "word", "ngram_range": (1, 2)},
            "char 2-4-grams": {"analyzer": "char_wb", "ngram_range": (2, 4)}}
MISSING = "scikit-learn is not installed (pip install 'chatforge[baselines]')"


def tfidf_logreg(train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]],
                 val: Sequence[tuple[str, str]] = (), labels: Sequence[str] | None = None, seed: int = 0
                 ) -> dict[str, Any]:
    """Fit on ``train`` (text, label) pairs, pick ``C`` on ``val``, score ``test``:
    ``{"available": True, "accuracy", "macro_f1", "features", "C", "val_macro_f1"}``, or
    ``{"available": False, "reason"}`` when scikit-learn is missing."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
    except ImportError:
        return {"available": False, "reason": MISSING}

    labels = list(labels) if labels is not None else sorted({y for _, y in train})
    y_train = [y for _, y in train]

    def logreg(c: float) -> Any:  # liblinear: fast on sparse text; more than two labels: one-vs-rest
        model = LogisticRegression(C=c, solver="liblinear", max_iter=1000, random_state=seed)
        return model if len(labels) == 2 else OneVsRestClassifier(model)

    def predict(vec: Any, model: Any, rows: Sequence[tuple[str, str]]) -> dict[str, Any]:
        pred = [str(p) for p in model.predict(vec.transform([t for t, _ in rows]))]
        return classification_report([y for _, y in rows], pred, labels)

    best: tuple[float | None, str, float, Any, Any] | None = None  # (val macro-F1, features, C, vectorizer, model)
    for features in FEATURES if val else ("word 1-2-grams",):
        vec = TfidfVectorizer(sublinear_tf=True, min_df=1, **FEATURES[features])
        x_train = vec.fit_transform([t for t, _ in train])  # once per feature set, for every C
        for c in C_GRID if val else (1.0,):
            model = logreg(c).fit(x_train, y_train)
            f1 = predict(vec, model, val)["macro_f1"] if val else None
            if best is None or (f1 is not None and f1 > best[0]):
                best = (f1, features, c, vec, model)
            if f1 == 1.0:
                break  # nothing scores higher on validation: skip the rest of the grid
        if best[0] == 1.0:
            break
    assert best is not None
    f1, features, c, vec, model = best
    report = predict(vec, model, test)
    return {"available": True, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "features": features,
            "C": c, "val_macro_f1": f1}
