"""Contamination check: held-out prompts and texts that also occur in the training data.

Real chat corpora repeat the same questions across files, so a random split leaves
copies of held-out rows in the training data and inflates held-out scores (BLEU
above all). Each held-out item is compared with every training text three ways,
and counted once, by the first that fires:

* ``exact``: the same text after lower-casing and collapsing whitespace
  (``data.dedup.exact_key`` of the normalised text);
* ``near``: MinHash-estimated Jaccard similarity of word shingles at least
  ``threshold`` with some training text (the signatures and shingles of
  ``data.dedup``, an LSH index to find candidates, confirmed by the signatures);
* ``contained``: at least ``overlap`` of the item's word ``ngram``-grams occur
  somewhere in the training data (a held-out question pasted into a longer
  training document, which Jaccard against the whole document misses).

``check(sets, train)`` returns the report; ``exclude(items, verdicts)`` the clean
subset. Memory: a signature per training text (~1 KB at 128 permutations) plus
one 8-byte hash per training n-gram.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from datasketch import LeanMinHash, MinHashLSH

from chatforge.data.dedup import SEED, Signer, exact_key, shingle_hashes
from chatforge.errors import ConfigError

THRESHOLD = 0.8
NUM_PERM = 128
SHINGLE_WORDS = 5
NGRAM = 8
OVERLAP = 0.8
EXAMPLES = 5  # contaminated items shown per set


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


@dataclass(frozen=True)
class Match:
    kind: str  # "exact" | "near" | "contained"
    train_id: str | None  # the training text matched (None for "contained": n-grams come from many texts)
    score: float  # 1.0 for exact; the Jaccard estimate for near; the n-gram overlap for contained


class TrainingIndex:
    """Exact keys, MinHash LSH and n-gram hashes of the training texts, for queries."""

    def __init__(self, texts: Iterable[tuple[str, str]], threshold: float = THRESHOLD, num_perm: int = NUM_PERM,
                 shingle_words: int = SHINGLE_WORDS, ngram: int = NGRAM, overlap: float = OVERLAP):
        if not 0.0 < threshold <= 1.0 or not 0.0 < overlap <= 1.0:
            raise ConfigError(f"contamination: threshold {threshold} and overlap {overlap} must be in (0, 1]")
        self.threshold, self.overlap, self.ngram = threshold, overlap, ngram
        self.signer = Signer(num_perm, shingle_words)
        try:
            # banding tuned for recall: a missed copy inflates scores, a false candidate is removed by the
            # signature comparison below
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(0.05, 0.95))
        except ValueError as e:
            raise ConfigError(f"contamination: threshold {threshold} is too high for {num_perm} permutations "
                              f"(datasketch: {e}); use at most 0.98") from e
        self.exact: dict[bytes, str] = {}
        self.ids: list[str] = []
        self.signatures: list[np.ndarray] = []
        grams: list[np.ndarray] = []
        self.n = 0
        for doc_id, text in texts:
            self.n += 1
            self.exact.setdefault(exact_key(_norm(text)), doc_id)
            sig = self.signer.signature(text)
            if sig is not None:
                self.lsh.insert(len(self.ids), LeanMinHash(seed=SEED, hashvalues=sig, scheme=self.signer.scheme),
                                check_duplication=False)
                self.ids.append(doc_id)
                self.signatures.append(sig)
            grams.append(shingle_hashes(text, ngram))
        self.grams = np.unique(np.concatenate(grams)) if grams else np.zeros(0, dtype=np.uint64)

    def match(self, text: str) -> Match | None:
        """The first way ``text`` occurs in the training data, or None."""
        hit = self.exact.get(exact_key(_norm(text)))
        if hit is not None:
            return Match("exact", hit, 1.0)
        sig = self.signer.signature(text)
        if sig is None:
            return None
        best: tuple[float, int] | None = None
        for key in self.lsh.query(LeanMinHash(seed=SEED, hashvalues=sig, scheme=self.signer.scheme)):
            sim = float(np.count_nonzero(self.signatures[key] == sig)) / len(sig)
            if sim >= self.threshold and (best is None or (sim, -key) > (best[0], -best[1])):
                best = (sim, key)
        if best is not None:
            return Match("near", self.ids[best[1]], round(best[0], 4))
        grams = shingle_hashes(text, self.ngram)
        if len(grams):
            share = float(np.isin(grams, self.grams).mean())
            if share >= self.overlap:
                return Match("contained", None, round(share, 4))
        return None


def check(sets: Mapping[str, Sequence[tuple[str, str]]], train: Iterable[tuple[str, str]] | TrainingIndex,
          examples: int = EXAMPLES, **index_args: Any) -> tuple[dict[str, Any], dict[str, list[Match | None]]]:
    """Compare each held-out set (name -> ``[(id, text)]``) with the training texts (``[(id, text)]``).

    Returns ``(report, verdicts)``: the report is JSON-able, ``{"threshold", "ngram", "overlap",
    "train_texts", "sets": {name: {"n", "exact", "near", "contained", "contaminated", "rate", "clean",
    "examples": [{"id", "text", "kind", "train_id", "score"}]}}}``; verdicts are per item, in order."""
    index = train if isinstance(train, TrainingIndex) else TrainingIndex(train, **index_args)
    report: dict[str, Any] = {"threshold": index.threshold, "ngram": index.ngram, "overlap": index.overlap,
                              "train_texts": index.n, "sets": {}}
    verdicts: dict[str, list[Match | None]] = {}
    for name, items in sets.items():
        got = [index.match(text) for _, text in items]
        verdicts[name] = got
        counts = {kind: sum(1 for m in got if m is not None and m.kind == kind) for kind in ("exact", "near", "contained")}
        bad = sum(counts.values())
        shown = [{"id": item_id, "text": text[:200], "kind": m.kind, "train_id": m.train_id, "score": m.score}
                 for (item_id, text), m in zip(items, got) if m is not None][:examples]
        report["sets"][name] = {"n": len(items), **counts, "contaminated": bad,
                                "rate": bad / len(items) if items else 0.0, "clean": len(items) - bad,
                                "examples": shown}
    return report, verdicts


def exclude(items: Sequence[Any], verdicts: Sequence[Match | None]) -> list[Any]:
    """The items whose verdict is None (not found in the training data)."""
    if len(items) != len(verdicts):
        raise ValueError(f"{len(items)} items but {len(verdicts)} verdicts")
    return [x for x, v in zip(items, verdicts) if v is None]
