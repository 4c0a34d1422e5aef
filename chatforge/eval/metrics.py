"""Task metrics: classification (accuracy, macro-F1, confusion), entity-level F1 over
BIO tags, and BLEU / chrF for generated text.

Classification and tagging metrics are a few lines of counting, written here so
that the semantics are pinned down and tested: entity F1 follows conlleval /
seqeval (an entity counts only when its type and exact span match; an ``I-X``
that does not continue an ``X`` entity starts a new one). BLEU and chrF come
from ``sacrebleu``, whose signature string records tokenisation and settings:
BLEU numbers are only comparable under the same signature.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from chatforge.errors import ChatforgeError, DataError


def _prf(correct: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    """Precision, recall and F1; 0 where a denominator is 0 (sklearn's zero_division=0)."""
    p = correct / n_pred if n_pred else 0.0
    r = correct / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


def _check_strings(values: Sequence[Any], what: str) -> None:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"{what}[{i}]: expected a string label, got {type(v).__name__} {v!r}")


# --------------------------------------------------------------------------- classification


def classification_report(y_true: Sequence[str], y_pred: Sequence[str],
                          labels: Sequence[str] | None = None) -> dict[str, Any]:
    """Accuracy, macro-F1, per-label precision/recall/F1/support, the confusion matrix
    and the majority-class baseline (the accuracy of always predicting ``y_true``'s
    most common label: a classifier that does not beat it has learned nothing).

    ``labels`` fixes the label order (default: sorted union of ``y_true`` and
    ``y_pred``); every true label must be in it. A prediction outside ``labels`` (a
    generative model answering something else) counts as wrong, is tallied in
    ``unknown_predictions`` and has no column in the confusion matrix, so such a
    row sums to less than its support.

    ``confusion[i][j]`` counts examples of true ``labels[i]`` predicted as ``labels[j]``.
    Macro-F1 is the unweighted mean of per-label F1 over ``labels``.
    """
    if len(y_true) != len(y_pred):
        raise DataError(f"classification_report: y_true has {len(y_true)} labels but y_pred has {len(y_pred)}")
    if not y_true:
        raise DataError("classification_report: no examples (y_true and y_pred are empty)")
    _check_strings(y_true, "y_true")
    _check_strings(y_pred, "y_pred")
    if labels is None:
        labels = sorted(set(y_true) | set(y_pred))
    else:
        labels = list(labels)
        _check_strings(labels, "labels")
        dupes = sorted(k for k, c in Counter(labels).items() if c > 1)
        if dupes:
            raise DataError(f"classification_report: labels repeat {dupes}")
        known = set(labels)
        for i, t in enumerate(y_true):
            if t not in known:
                raise DataError(f"classification_report: y_true[{i}] = {t!r} is not one of labels {labels}")
    index = {label: i for i, label in enumerate(labels)}
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    unknown = 0
    for t, p in zip(y_true, y_pred):
        if p in index:
            confusion[index[t]][index[p]] += 1
        else:
            unknown += 1
    n = len(y_true)
    support = Counter(y_true)
    predicted = Counter(y_pred)
    per_label: dict[str, dict[str, float | int]] = {}
    for label in labels:
        tp = confusion[index[label]][index[label]]
        p, r, f = _prf(tp, predicted[label], support[label])
        per_label[label] = {"precision": p, "recall": r, "f1": f, "support": support[label]}
    # Ties go to the label listed first, so the baseline is deterministic.
    majority = max(labels, key=lambda label: (support[label], -index[label]))
    return {
        "n": n,
        "accuracy": sum(t == p for t, p in zip(y_true, y_pred)) / n,
        "macro_f1": sum(v["f1"] for v in per_label.values()) / k,
        "majority_label": majority,
        "majority_baseline": support[majority] / n,
        "per_label": per_label,
        "labels": labels,
        "confusion": confusion,
        "unknown_predictions": unknown,
    }


def format_confusion(report: dict[str, Any]) -> str:
    """The confusion matrix of a ``classification_report`` as a text table
    (rows: true label, columns: predicted label)."""
    try:
        labels, matrix = report["labels"], report["confusion"]
    except (KeyError, TypeError):
        raise ChatforgeError("format_confusion: expected a classification_report dict with 'labels' and "
                             "'confusion'") from None
    corner = "true \\ pred"
    names = [str(label) for label in labels]
    width = max([len(s) for s in names] + [len(str(c)) for row in matrix for c in row] + [1])
    first = max([len(corner)] + [len(s) for s in names])
    lines = [corner.ljust(first) + "".join("  " + s.rjust(width) for s in names)]
    for name, row in zip(names, matrix):
        lines.append(name.ljust(first) + "".join("  " + str(c).rjust(width) for c in row))
    return "\n".join(lines)


# --------------------------------------------------------------------------- sequence tagging


def _parse_tag(tag: Any, where: str) -> tuple[str, str] | None:
    """``"O"`` -> None; ``"B-PER"`` -> ("B", "PER"); anything else is an error."""
    if not isinstance(tag, str):
        raise DataError(f"{where}: expected a BIO tag string, got {type(tag).__name__} {tag!r}")
    if tag == "O":
        return None
    prefix, sep, kind = tag.partition("-")
    if prefix not in ("B", "I") or not sep or not kind:
        raise DataError(f"{where}: tag {tag!r} is not BIO; expected 'O', 'B-TYPE' or 'I-TYPE'")
    return prefix, kind


def bio_entities(tags: Sequence[str], where: str = "tags") -> list[tuple[str, int, int]]:
    """Entities ``(type, start, end)`` (end exclusive) of one BIO-tagged sentence.

    conlleval rules: ``B-X`` always starts an entity; ``I-X`` continues the current
    entity only if it is of type X, otherwise (after ``O``, at the start, or after
    another type) it starts a new one; ``O`` and the sentence end close it.
    """
    entities: list[tuple[str, int, int]] = []
    kind: str | None = None  # the open entity's type
    start = 0
    for i, tag in enumerate(tags):
        parsed = _parse_tag(tag, f"{where}[{i}]")
        if parsed is not None and parsed[0] == "I" and parsed[1] == kind:
            continue
        if kind is not None:
            entities.append((kind, start, i))
        kind, start = (None, i) if parsed is None else (parsed[1], i)
    if kind is not None:
        entities.append((kind, start, len(tags)))
    return entities


def entity_f1(true_tags: Sequence[Sequence[str]], pred_tags: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Entity-level precision / recall / F1 (micro over all entities, and per type),
    plus token accuracy. A predicted entity is correct only if a true entity has
    the same type and exactly the same span in the same sentence.

    Returns ``{"precision", "recall", "f1", "n_true", "n_pred", "n_correct",
    "token_accuracy", "per_type": {type: {"precision", "recall", "f1", "support", "n_pred"}}}``.
    """
    if len(true_tags) != len(pred_tags):
        raise DataError(f"entity_f1: true_tags has {len(true_tags)} sentences but pred_tags has {len(pred_tags)}")
    true_set: set[tuple[int, str, int, int]] = set()
    pred_set: set[tuple[int, str, int, int]] = set()
    tokens = same = 0
    for s, (t_seq, p_seq) in enumerate(zip(true_tags, pred_tags)):
        if isinstance(t_seq, str) or isinstance(p_seq, str):
            raise DataError(f"entity_f1: sentence {s} must be a list of tags, got a string")
        if len(t_seq) != len(p_seq):
            raise DataError(
                f"entity_f1: sentence {s} has {len(t_seq)} true tags but {len(p_seq)} predicted tags"
            )
        true_set.update((s, *e) for e in bio_entities(t_seq, f"true_tags[{s}]"))
        pred_set.update((s, *e) for e in bio_entities(p_seq, f"pred_tags[{s}]"))
        tokens += len(t_seq)
        same += sum(a == b for a, b in zip(t_seq, p_seq))
    correct = true_set & pred_set
    per_type: dict[str, dict[str, float | int]] = {}
    for kind in sorted({e[1] for e in true_set | pred_set}):
        n_true = sum(e[1] == kind for e in true_set)
        n_pred = sum(e[1] == kind for e in pred_set)
        p, r, f = _prf(sum(e[1] == kind for e in correct), n_pred, n_true)
        per_type[kind] = {"precision": p, "recall": r, "f1": f, "support": n_true, "n_pred": n_pred}
    p, r, f = _prf(len(correct), len(pred_set), len(true_set))
    return {
        "precision": p,
        "recall": r,
        "f1": f,
        "n_true": len(true_set),
        "n_pred": len(pred_set),
        "n_correct": len(correct),
        "token_accuracy": same / tokens if tokens else 0.0,
        "per_type": per_type,
    }


# --------------------------------------------------------------------------- generated text


def bleu_chrf(hypotheses: Sequence[str], references: Sequence[str]) -> dict[str, Any]:
    """Corpus BLEU and chrF (0-100) of ``hypotheses`` against one reference each,
    with sacrebleu's default settings and their signatures (cite these with the scores)."""
    if len(hypotheses) != len(references):
        raise DataError(f"bleu_chrf: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise DataError("bleu_chrf: no hypotheses to score")
    _check_strings(hypotheses, "hypotheses")
    _check_strings(references, "references")
    try:
        from sacrebleu.metrics import BLEU, CHRF
    except ImportError:
        raise ChatforgeError("bleu_chrf needs sacrebleu: pip install sacrebleu") from None
    refs = [list(references)]  # sacrebleu takes reference *streams*: one list per reference set
    bleu, chrf = BLEU(), CHRF()
    return {
        "bleu": float(bleu.corpus_score(list(hypotheses), refs).score),
        "chrf": float(chrf.corpus_score(list(hypotheses), refs).score),
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }
