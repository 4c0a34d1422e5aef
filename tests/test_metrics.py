"""Task metrics on hand-made cases whose answers were worked out by hand."""

from __future__ import annotations

import pytest

from chatforge.errors import DataError
from chatforge.eval.metrics import bio_entities, bleu_chrf, classification_report, entity_f1, format_confusion

Y_TRUE = ["cat", "cat", "cat", "dog", "dog", "dog", "dog", "bird"]
Y_PRED = ["cat", "cat", "dog", "dog", "dog", "dog", "cat", "bird"]


def test_classification_report_by_hand():
    r = classification_report(Y_TRUE, Y_PRED)
    assert r["n"] == 8 and r["accuracy"] == 0.75
    assert r["labels"] == ["bird", "cat", "dog"]
    # bird: 1/1 right; cat: 2 of 3 predicted, 2 of 3 true; dog: 3 of 4 predicted, 3 of 4 true.
    assert r["per_label"]["bird"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 1}
    assert r["per_label"]["cat"]["precision"] == pytest.approx(2 / 3)
    assert r["per_label"]["cat"]["recall"] == pytest.approx(2 / 3)
    assert r["per_label"]["dog"]["f1"] == pytest.approx(3 / 4)
    assert r["per_label"]["dog"]["support"] == 4
    assert r["macro_f1"] == pytest.approx((1 + 2 / 3 + 3 / 4) / 3)  # = 29/36
    assert r["majority_label"] == "dog" and r["majority_baseline"] == 0.5
    assert r["confusion"] == [[1, 0, 0], [0, 2, 1], [0, 1, 3]]
    assert r["unknown_predictions"] == 0


def test_precision_recall_asymmetric_and_never_predicted_label():
    # "a" is predicted for everything: precision 2/4, recall 1; "b" is never predicted: all 0, no error.
    r = classification_report(["a", "a", "b", "b"], ["a", "a", "a", "a"])
    assert r["per_label"]["a"] == {"precision": 0.5, "recall": 1.0, "f1": pytest.approx(2 / 3), "support": 2}
    assert r["per_label"]["b"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert r["macro_f1"] == pytest.approx(1 / 3)
    assert r["majority_label"] == "a"  # a tie goes to the first label
    assert r["majority_baseline"] == 0.5


def test_fixed_labels_and_predictions_outside_them():
    r = classification_report(["yes", "no", "no"], ["yes", "maybe", "no"], labels=["yes", "no"])
    assert r["labels"] == ["yes", "no"]
    assert r["accuracy"] == pytest.approx(2 / 3)
    assert r["unknown_predictions"] == 1
    assert r["confusion"] == [[1, 0], [0, 1]]
    assert r["per_label"]["no"]["recall"] == 0.5 and r["per_label"]["no"]["precision"] == 1.0


def test_classification_report_errors():
    with pytest.raises(DataError, match="y_true has 2 labels but y_pred has 1"):
        classification_report(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no examples"):
        classification_report([], [])
    with pytest.raises(DataError, match=r"y_true\[1\] = 'c' is not one of labels"):
        classification_report(["a", "c"], ["a", "a"], labels=["a", "b"])
    with pytest.raises(DataError, match=r"y_pred\[0\]: expected a string label, got int"):
        classification_report(["a"], [1])
    with pytest.raises(DataError, match="labels repeat"):
        classification_report(["a"], ["a"], labels=["a", "a"])


def test_format_confusion_table():
    text = format_confusion(classification_report(Y_TRUE, Y_PRED))
    assert text.splitlines() == [
        "true \\ pred  bird   cat   dog",
        "bird            1     0     0",
        "cat             0     2     1",
        "dog             0     1     3",
    ]


# --------------------------------------------------------------------------- BIO entities


def test_bio_span_rules():
    # I- after O (and at the start) opens a new entity.
    assert bio_entities(["I-PER", "I-PER", "O", "I-PER"]) == [("PER", 0, 2), ("PER", 3, 4)]
    # A type change mid-span ends one entity and starts another.
    assert bio_entities(["B-LOC", "I-PER", "I-PER"]) == [("LOC", 0, 1), ("PER", 1, 3)]
    # B- right after an entity of the same type starts a second one.
    assert bio_entities(["B-PER", "B-PER", "I-PER"]) == [("PER", 0, 1), ("PER", 1, 3)]
    # An entity that runs to the end of the sentence is still closed; types may contain '-'.
    assert bio_entities(["O", "B-WORK-OF-ART", "I-WORK-OF-ART"]) == [("WORK-OF-ART", 1, 3)]
    assert bio_entities(["O", "O"]) == [] and bio_entities([]) == []


def test_entity_f1_by_hand():
    true = [["B-PER", "I-PER", "O", "B-LOC"],  # PER 0-2, LOC at the sentence end
            ["O", "I-ORG", "I-ORG", "O"],  # I- after O: ORG 1-3
            ["B-PER", "I-LOC"]]  # type change: PER 0-1, LOC 1-2
    pred = [["B-PER", "I-PER", "O", "O"],  # PER right, LOC missed
            ["O", "B-ORG", "I-ORG", "O"],  # the same ORG span: right
            ["B-PER", "I-PER"]]  # PER 0-2: wrong span
    r = entity_f1(true, pred)
    assert (r["n_true"], r["n_pred"], r["n_correct"]) == (5, 3, 2)
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(2 / 5)
    assert r["f1"] == pytest.approx(0.5)
    assert r["per_type"]["PER"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2, "n_pred": 2}
    assert r["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2, "n_pred": 0}
    assert r["per_type"]["ORG"]["f1"] == 1.0
    assert r["token_accuracy"] == pytest.approx(7 / 10)


def test_entities_do_not_cross_sentences():
    # An I-PER opening sentence 2 must not continue sentence 1's PER.
    r = entity_f1([["B-PER"], ["I-PER"]], [["B-PER"], ["B-PER"]])
    assert r["n_true"] == 2 and r["n_correct"] == 2 and r["f1"] == 1.0


def test_entity_f1_errors():
    with pytest.raises(DataError, match="true_tags has 2 sentences but pred_tags has 1"):
        entity_f1([["O"], ["O"]], [["O"]])
    with pytest.raises(DataError, match="sentence 1 has 2 true tags but 1 predicted tags"):
        entity_f1([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(DataError, match=r"pred_tags\[0\]\[1\]: tag 'E-PER' is not BIO"):
        entity_f1([["O", "O"]], [["O", "E-PER"]])
    with pytest.raises(DataError, match=r"true_tags\[0\]\[0\]: tag 'B' is not BIO"):
        entity_f1([["B"]], [["O"]])
    with pytest.raises(DataError, match="must be a list of tags"):
        entity_f1(["B-PER"], ["B-PER"])


# --------------------------------------------------------------------------- BLEU / chrF


def test_bleu_chrf_identical_and_disjoint():
    hyps = ["the cat sat on the mat", "where is my order number 42"]
    r = bleu_chrf(hyps, list(hyps))
    assert r["bleu"] == pytest.approx(100.0) and r["chrf"] == pytest.approx(100.0)
    assert "nrefs:1" in r["bleu_signature"] and "tok:13a" in r["bleu_signature"]
    assert "version:" in r["bleu_signature"] and "nc:6" in r["chrf_signature"]
    r = bleu_chrf(["xyz qqq"], ["the cat sat on the mat"])
    assert r["bleu"] == 0.0 and r["chrf"] < 5.0
    partial = bleu_chrf(["the cat sat on a mat"], ["the cat sat on the mat"])
    assert 0.0 < partial["bleu"] < 100.0 and 0.0 < partial["chrf"] < 100.0


def test_bleu_chrf_errors():
    with pytest.raises(DataError, match="2 hypotheses but 1 references"):
        bleu_chrf(["a", "b"], ["a"])
    with pytest.raises(DataError, match="no hypotheses"):
        bleu_chrf([], [])
    with pytest.raises(DataError, match=r"references\[0\]: expected a string"):
        bleu_chrf(["a"], [None])
