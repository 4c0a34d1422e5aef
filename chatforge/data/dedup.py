"""Exact and near-duplicate detection.

Exact: a 128-bit BLAKE2 hash of the text with whitespace runs collapsed, so copies
that differ only in spacing or line wrapping count as the same document.

Near: MinHash signatures of word shingles (lower-cased ``shingle_words``-grams)
indexed with ``datasketch.MinHashLSH``. Shingles are hashed without building
their strings: each word is hashed once (CRC32, in C), and the hashes of ``k``
consecutive words are combined by a polynomial rolling hash vectorised with
numpy; datasketch then applies its permutations (its ``affine32`` scheme premixes
every input hash with the MurmurHash3 finalizer, so CRC32's linearity does not
matter). This is about 5x faster than datasketch's default per-shingle SHA-1. Signatures are pure functions of the text
(fixed permutation seed), so worker processes compute them and the main process
only queries and inserts, in document order: the first occurrence is kept and the
result does not depend on how many workers ran. LSH candidates are confirmed by
the signatures' estimated Jaccard similarity, which removes the banding's false
positives. Memory: about 2.5 KB per kept document (LSH buckets + signature).
"""

from __future__ import annotations

import hashlib
import re
import zlib

import numpy as np
from datasketch import LeanMinHash, MinHash, MinHashLSH

from chatforge.errors import ConfigError

SEED = 1  # permutation seed: fixed so signatures are comparable across processes and runs
_WORD = re.compile(r"\w+")
_ROLL = np.uint64(0x100000001B3)  # FNV-64 prime, the multiplier of the rolling shingle hash


def exact_key(text: str) -> bytes:
    """Hash of the whitespace-normalised text (16 bytes)."""
    return hashlib.blake2b(" ".join(text.split()).encode("utf-8", "surrogatepass"), digest_size=16).digest()


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of the lower-cased ``k``-word shingles (one shingle if fewer words).

    Repeated shingles give repeated hashes, which MinHash ignores (it keeps minima).
    """
    words = _WORD.findall(text.lower())
    if not words:
        return np.zeros(0, dtype=np.uint64)
    word_hashes = np.fromiter(map(zlib.crc32, map(str.encode, words)), dtype=np.uint64, count=len(words))
    k = min(k, len(words))
    n = len(words) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    for j in range(k):  # h = sum_j word[i + j] * P^(k-1-j)  (mod 2^64, wrapping)
        h = h * _ROLL + word_hashes[j:j + n]
    return (h ^ (h >> np.uint64(32))) & np.uint64(0xFFFFFFFF)


class Signer:
    """Computes MinHash signatures with permutations generated once."""

    def __init__(self, num_perm: int, shingle_words: int):
        self.num_perm = num_perm
        self.shingle_words = shingle_words
        template = MinHash(num_perm=num_perm, seed=SEED)
        self.permutations = template.permutations
        self.scheme = template.scheme

    def signature(self, text: str) -> np.ndarray | None:
        """The MinHash signature of the text's shingles; ``None`` for a text with no words."""
        hashes = shingle_hashes(text, self.shingle_words)
        if not len(hashes):
            return None
        m = MinHash(num_perm=self.num_perm, seed=SEED, permutations=self.permutations, scheme=self.scheme,
                    hashfunc=int)  # inputs are already hashes
        m.update_batch(hashes.tolist())
        return m.hashvalues


class NearDuplicateIndex:
    """An LSH index of kept documents; ``match`` finds the earlier document a new one repeats."""

    def __init__(self, threshold: float, num_perm: int, scheme: str):
        self.threshold = threshold
        self.scheme = scheme
        try:
            self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        except ValueError as e:  # thresholds near 1 leave fewer than 2 bands
            raise ConfigError(
                f"clean.minhash_threshold: {threshold} is too high for clean.minhash_num_perm {num_perm} "
                f"(datasketch: {e}); lower the threshold (0.98 works with 128) or disable clean.near_dedup"
            ) from e
        self.signatures: list[np.ndarray] = []
        self.ids: list[str] = []

    def match_or_add(self, doc_id: str, signature: np.ndarray) -> tuple[str, float] | None:
        """If an earlier kept document is at least ``threshold`` similar, return its
        ``(id, estimated Jaccard)`` (the earliest such); else index this one and return None."""
        m = LeanMinHash(seed=SEED, hashvalues=signature, scheme=self.scheme)
        for key in sorted(self.lsh.query(m)):
            similarity = float(np.count_nonzero(self.signatures[key] == signature)) / len(signature)
            if similarity >= self.threshold:
                return self.ids[key], similarity
        self.lsh.insert(len(self.signatures), m, check_duplication=False)
        self.signatures.append(signature)
        self.ids.append(doc_id)
        return None
