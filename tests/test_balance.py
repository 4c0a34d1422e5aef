"""Balance: reports over fields and derived attributes, downsample, reweight, errors, CLI, weighted loss."""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from chatforge.cli import main
from chatforge.data.balance import (
    NameGroups,
    balance_file,
    gendered_counts,
    load_name_groups,
    read_table,
    report,
    report_path,
)
from chatforge.errors import ChatforgeError, DataError


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def labelled(counts: dict[str, int], **extra) -> list[dict]:
    rows = []
    for label, n in counts.items():
        rows += [{"text": f"{label} example {i}", "label": label, **extra} for i in range(n)]
    return rows


def chat(user: str, answer: str, intent: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
            "intent": intent}


# --------------------------------------------------------------------------- the report


def test_report_counts_shares_imbalance_and_entropy(tmp_path):
    src = write_rows(tmp_path / "rows.jsonl", labelled({"a": 6, "b": 3, "c": 1}))
    result = balance_file(src, ["label"])
    assert result["mode"] == "report" and "after" not in result
    label = result["before"]["attributes"]["label"]
    assert label["values"] == {"a": {"count": 6, "share": 0.6}, "b": {"count": 3, "share": 0.3},
                               "c": {"count": 1, "share": 0.1}}
    assert label["distinct"] == 3 and label["imbalance_ratio"] == 6.0
    entropy = -(0.6 * math.log(0.6) + 0.3 * math.log(0.3) + 0.1 * math.log(0.1))
    assert label["normalized_entropy"] == round(entropy / math.log(3), 4)
    assert result["before"]["rows"] == 10 and result["before"]["by"] == ["label"]


def test_non_string_fields_group_as_json_and_joint_values(tmp_path):
    rows = [{"text": "x", "label": "a", "stars": 5, "ok": True}, {"text": "y", "label": "a", "stars": 1, "ok": None},
            {"text": "z", "label": "b", "stars": 5, "ok": True}]
    before = balance_file(write_rows(tmp_path / "r.jsonl", rows), ["label", "stars", "ok"])["before"]
    assert set(before["attributes"]["stars"]["values"]) == {"5", "1"}
    assert set(before["attributes"]["ok"]["values"]) == {"true", "null"}
    assert before["joint"]["values"] == {"a | 1 | null": {"count": 1, "share": 0.3333},
                                         "a | 5 | true": {"count": 1, "share": 0.3333},
                                         "b | 5 | true": {"count": 1, "share": 0.3333}}
    assert before["joint"]["imbalance_ratio"] == 1.0 and before["joint"]["normalized_entropy"] == 1.0


def test_gendered_terms_of_chat_and_classification_rows(tmp_path):
    assert gendered_counts("My wife's order and her son\u2019s gift, ma'am. Hello there.") == (3, 1)
    assert gendered_counts("The man-made shelf; he said THE MOTHER board") == (1, 1)  # "man-made" is not a man
    rows = [chat("It is a gift for my mother.", "Happy to help.", "gift"),
            chat("My husband ordered it.", "I can help her and him.", "gift"),
            chat("Where is my parcel?", "It ships today.", "status"),
            {"text": "He returned it.", "label": "x"}]
    before = balance_file(write_rows(tmp_path / "c.jsonl", rows), ["gendered_terms"])["before"]
    g = before["attributes"]["gendered_terms"]
    assert {k: v["count"] for k, v in g["values"].items()} == {"both": 1, "female": 1, "male": 1, "none": 1}
    assert g["terms"] == {"female": 2, "male": 3}


def test_names_without_and_with_groups(tmp_path):
    rows = [chat("Hi, I am Maria.", "Hello Maria, let me check.", "a"), chat("James here.", "Hi James.", "a"),
            chat("Maria and James share an account.", "Sure.", "b"), chat("There is a grace period?", "Yes.", "b"),
            {"text": "Liam wrote a review", "label": "pos"}]
    src = write_rows(tmp_path / "c.jsonl", rows)
    names = balance_file(src, ["names"])["before"]["attributes"]["names"]  # SupportWorld's first names
    assert {k: v["count"] for k, v in names["values"].items()} == {"James": 1, "James+Maria": 1, "Liam": 1,
                                                                     "Maria": 1, "none": 1}  # "grace" is no name
    assert names["grouped"] is False and "FIRST_NAMES" in names["names_from"]
    assert names["top_names"][:2] == [{"name": "James", "rows": 2, "share": 0.4}, {"name": "Maria", "rows": 2,
                                                                                    "share": 0.4}]
    groups = tmp_path / "names.txt"
    groups.write_text("# name,group\nMaria,f\nJames,m\nLiam\tm\n", encoding="utf-8")
    ng = load_name_groups(groups)
    assert ng.groups == {"Maria": "f", "James": "m", "Liam": "m"}
    grouped = balance_file(src, ["names"], names=ng)["before"]["attributes"]["names"]
    assert {k: v["count"] for k, v in grouped["values"].items()} == {"f": 1, "m": 2, "f+m": 1, "none": 1}
    (tmp_path / "names.json").write_text(json.dumps({"Maria": "f"}), encoding="utf-8")
    assert load_name_groups(tmp_path / "names.json").groups == {"Maria": "f"}


# --------------------------------------------------------------------------- downsample and reweight


def test_downsample_balances_and_the_after_report_is_the_written_file(tmp_path):
    rows = labelled({"a": 30, "b": 12, "c": 5}, split="train")
    src = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out" / "balanced.jsonl"
    result = balance_file(src, ["label"], "downsample", out, seed=7)
    written = read_rows(out)
    counts = Counter(r["label"] for r in written)
    assert counts == {"a": 5, "b": 5, "c": 5}
    after = result["after"]["attributes"]["label"]
    assert {k: v["count"] for k, v in after["values"].items()} == dict(counts)
    assert after["imbalance_ratio"] == 1.0 and after["normalized_entropy"] == 1.0
    assert result["before"]["attributes"]["label"]["imbalance_ratio"] == 6.0
    # A subset of the input rows, unchanged and in their original order.
    positions = [rows.index(r) for r in written]
    assert positions == sorted(positions)
    assert json.loads(report_path(out).read_text(encoding="utf-8")) == result
    assert report_path(out).name == "balanced.jsonl.balance.json"
    # The seed decides which rows; the same seed the same ones.
    again = balance_file(src, ["label"], "downsample", tmp_path / "again.jsonl", seed=7)
    assert read_rows(tmp_path / "again.jsonl") == written and again["after"] == {**result["after"],
                                                                                 "file": str(tmp_path / "again.jsonl")}
    balance_file(src, ["label"], "downsample", tmp_path / "other.jsonl", seed=8)
    assert read_rows(tmp_path / "other.jsonl") != written
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["balanced.jsonl", "balanced.jsonl.balance.json"]


def test_downsample_on_the_joint_value(tmp_path):
    rows = (labelled({"a": 8}, split="train") + labelled({"a": 3}, split="val")
            + labelled({"b": 4}, split="train") + labelled({"b": 2}, split="val"))
    out = tmp_path / "o.jsonl"
    result = balance_file(write_rows(tmp_path / "r.jsonl", rows), ["label", "split"], "downsample", out)
    assert Counter((r["label"], r["split"]) for r in read_rows(out)) == {(lab, s): 2 for lab in "ab"
                                                                          for s in ("train", "val")}
    assert result["after"]["joint"]["imbalance_ratio"] == 1.0 and result["after"]["rows"] == 8


def test_reweight_gives_every_value_the_same_total_weight(tmp_path):
    rows = labelled({"a": 30, "b": 12, "c": 5})
    rows[0]["weight"] = 9.0  # an earlier weight is replaced
    out = tmp_path / "w.jsonl"
    result = balance_file(write_rows(tmp_path / "rows.jsonl", rows), ["label"], "reweight", out)
    written = read_rows(out)
    assert len(written) == len(rows) and [{k: v for k, v in r.items() if k != "weight"} for r in written] == [
        {k: v for k, v in r.items() if k != "weight"} for r in rows]
    totals: dict[str, float] = {}
    for r in written:
        totals[r["label"]] = totals.get(r["label"], 0.0) + r["weight"]
    n, k = len(rows), 3
    assert all(t == pytest.approx(n / k) for t in totals.values())
    assert sum(r["weight"] for r in written) == pytest.approx(n)  # weights average 1: the loss keeps its scale
    assert written[0]["weight"] == pytest.approx(n / (k * 30))
    after = result["after"]["attributes"]["label"]
    assert result["after"]["weighted"] is True
    assert {v: (e["count"], e["share"]) for v, e in after["values"].items()} == {
        "a": (30, 0.3333), "b": (12, 0.3333), "c": (5, 0.3333)}
    assert all(e["weight"] == pytest.approx(n / k, abs=1e-5) for e in after["values"].values())
    assert after["imbalance_ratio"] == 1.0 and after["normalized_entropy"] == 1.0


# --------------------------------------------------------------------------- errors


def test_missing_attribute_names_file_line_and_field(tmp_path):
    rows = [{"text": "a", "label": "x"}, {"text": "b", "label": "y"}, {"text": "c"}]
    src = write_rows(tmp_path / "rows.jsonl", rows)
    out = tmp_path / "out.jsonl"
    out.write_text("earlier\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"rows\.jsonl:3: missing field 'label' \(fields present: text\)"):
        balance_file(src, ["label"], "downsample", out)
    assert out.read_text(encoding="utf-8") == "earlier\n"  # nothing written on an error
    assert not report_path(out).exists()


@pytest.mark.parametrize(("rows", "by", "message"), [
    ([{"text": "a", "label": ["x"]}], ["label"], r"r\.jsonl:1: field 'label' must be a string, number, boolean or "
                                                 r"null to group rows by, got list"),
    ([{"label": "x"}], ["gendered_terms"], r"r\.jsonl:1: no field 'text' or 'messages'"),
    ([{"messages": [{"role": "user"}]}], ["names"], r"r\.jsonl:1: field 'messages'\[0\]: needs a string 'content'"),
    ([{"messages": "hi"}], ["names"], r"r\.jsonl:1: field 'messages' must be a list"),
])
def test_bad_rows_are_located(tmp_path, rows, by, message):
    with pytest.raises(DataError, match=message):
        balance_file(write_rows(tmp_path / "r.jsonl", rows), by)


def test_bad_arguments(tmp_path):
    src = write_rows(tmp_path / "r.jsonl", labelled({"a": 2, "b": 1}))
    with pytest.raises(ChatforgeError, match="--out is for --mode downsample or reweight"):
        balance_file(src, ["label"], "report", tmp_path / "o.jsonl")
    with pytest.raises(ChatforgeError, match="--mode reweight needs --out"):
        balance_file(src, ["label"], "reweight")
    with pytest.raises(ChatforgeError, match="is the input file"):
        balance_file(src, ["label"], "downsample", src)
    with pytest.raises(ChatforgeError, match="give a .jsonl path"):
        balance_file(src, ["label"], "downsample", tmp_path / "o.json")
    with pytest.raises(ChatforgeError, match="given twice"):
        balance_file(src, ["label", "label"])
    with pytest.raises(DataError, match=r"no rows"):
        balance_file(write_rows(tmp_path / "empty.jsonl", []), ["label"])
    (tmp_path / "bad.txt").write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.txt: no names"):
        load_name_groups(tmp_path / "bad.txt")


# --------------------------------------------------------------------------- CLI


def test_cli_balance(tmp_path, capsys):
    src = write_rows(tmp_path / "rows.jsonl", labelled({"a": 6, "b": 2}))
    out = tmp_path / "o.jsonl"
    assert main(["data", "balance", str(src), "--by", "label", "--mode", "downsample", "--out", str(out),
                 "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "label: 2 values, imbalance 3" in text and "wrote" in text
    assert Counter(r["label"] for r in read_rows(out)) == {"a": 2, "b": 2}
    assert main(["data", "balance", str(src), "--by", "label", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["before"]["attributes"]["label"]["values"]["a"]["count"] == 6
    assert main(["data", "balance", str(src), "--by", "intent"]) == 2
    assert "rows.jsonl:1: missing field 'intent'" in capsys.readouterr().err


# --------------------------------------------------------------------------- the weighted classification loss


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits

    def forward(self, idx, mask):
        return self.logits


class Tok:
    bos_id, pad_id = 1, 0

    def encode(self, text):
        return [2 + (ord(c) % 50) for c in text]


def test_classifier_loss_honours_reweight_output(tmp_path):
    from chatforge.finetune.classify import classify_loss, collate, encode_labelled, read_labelled_weighted

    out = tmp_path / "w.jsonl"
    balance_file(write_rows(tmp_path / "rows.jsonl", labelled({"a": 3, "b": 1})), ["label"], "reweight", out)
    rows, weights = read_labelled_weighted(out, "text", "label", weight_field="weight")
    assert weights == pytest.approx([4 / 6] * 3 + [2.0])
    assert read_labelled_weighted(out, "text", "label")[1] is None  # opt-in: no weight_field, no weights
    data = encode_labelled(rows, Tok(), ["a", "b"], 16, str(out), weights=weights)
    batch = collate(data.examples, Tok.pad_id, torch.device("cpu"))
    logits = torch.tensor([[2.0, 0.0], [0.5, 0.1], [0.0, 1.0], [0.3, 0.2]])
    model = FixedLogits(logits)
    loss = classify_loss(model, batch)
    per = torch.nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
    assert float(loss.sum) == pytest.approx(float((per * torch.tensor(weights)).sum()))
    assert loss.count == 4  # still per example: weights averaging 1 keep the loss's scale
    plain = collate(encode_labelled(rows, Tok(), ["a", "b"], 16, str(out)).examples, Tok.pad_id,
                    torch.device("cpu"))
    assert "weights" not in plain and float(classify_loss(model, plain).sum) == pytest.approx(float(per.sum()))


def test_bad_weight_names_file_line_and_field(tmp_path):
    from chatforge.finetune.classify import read_labelled_weighted

    src = write_rows(tmp_path / "r.jsonl", [{"text": "a", "label": "x", "w": 1}, {"text": "b", "label": "y", "w": "2kg"}])
    with pytest.raises(DataError, match=r"r\.jsonl:2: field 'w' must be a finite number >= 0 \(a loss weight\), "
                                        r"got '2kg'"):
        read_labelled_weighted(src, "text", "label", weight_field="w")


def test_read_table_and_report_weighted_directly(tmp_path):
    src = write_rows(tmp_path / "r.jsonl", labelled({"a": 2, "b": 2}))
    table = read_table(src, ["label"], NameGroups({}, "none"))
    weighted = report(table, [1.0, 1.0, 3.0, 3.0])
    assert weighted["attributes"]["label"]["values"]["b"] == {"count": 2, "weight": 6.0, "share": 0.75}
    assert weighted["attributes"]["label"]["imbalance_ratio"] == 3.0
