"""Classical text-classification baseline: TF-IDF + logistic regression (scikit-learn).

What a practitioner compares a fine-tuned classifier against: word uni- and bigram
TF-IDF (sublinear term frequency) into a multinomial logistic regression, fitted on the
same training split. The inverse regularisation strength ``C`` is chosen from a small
grid by macro-F1 on the validation split (when there is one), as anyone tuning the
baseline would; the test split is scored once. scikit-learn is an optional extra
(``pip install 'chatforge[baselines]'``); without it the result says so instead of failing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from chatforge.eval.metrics import classification_report

C_GRID = (0.1, 1.0, 10.0, 100.0)
MISSING = "scikit-learn is not installed (pip install 'chatforge[baselines]')"


def tfidf_logreg(train: Sequence[tuple[str, str]], test: Sequence[tuple[str, str]],
                 val: Sequence[tuple[str, str]] = (), labels: Sequence[str] | None = None, seed: int = 0
                 ) -> dict[str, Any]:
    """Fit on ``train`` (text, label) pairs, pick ``C`` on ``val``, score ``test``:
    ``{"available": True, "accuracy", "macro_f1", "C", "val_macro_f1"}``, or
    ``{"available": False, "reason"}`` when scikit-learn is missing."""
    try:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
    except ImportError:
        return {"available": False, "reason": MISSING}

    labels = list(labels) if labels is not None else sorted({y for _, y in train})
    vec = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, min_df=1)
    x_train = vec.fit_transform([t for t, _ in train])
    y_train = [y for _, y in train]

    def fit(c: float) -> Any:
        return LogisticRegression(C=c, max_iter=2000, random_state=seed).fit(x_train, y_train)

    def score(model: Any, rows: Sequence[tuple[str, str]]) -> dict[str, Any]:
        pred = [str(p) for p in model.predict(vec.transform([t for t, _ in rows]))]
        return classification_report([y for _, y in rows], pred, labels)

    best_c, best_f1 = 1.0, None
    if val:
        for c in C_GRID:
            f1 = score(fit(c), val)["macro_f1"]
            if best_f1 is None or f1 > best_f1:
                best_c, best_f1 = c, f1
    report = score(fit(best_c), test)
    return {"available": True, "accuracy": report["accuracy"], "macro_f1": report["macro_f1"], "C": best_c,
            "val_macro_f1": best_f1}
