"""The character tokenizer: one id per character seen in training, bytes for the rest.

The vocabulary is the most frequent characters of the training text. A character
outside it (an emoji that never appeared, say) is written as its UTF-8 bytes,
each one a byte-fallback id, so every string still round-trips exactly. Scores
per character (bits per character, character error rates) are natural with it,
which makes it the reference when comparing tokenizers on small corpora.

ids: 0..255 byte fallback, then the characters (most frequent first), then the
special tokens.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from pathlib import Path

from chatforge.errors import ConfigError, DataError
from chatforge.tokenizer.base import (
    META_FILE,
    SPECIAL_TOKENS,
    Tokenizer,
    check_special_ids,
    encode_error,
    read_meta,
)

_BYTES = [bytes([b]) for b in range(256)]


class CharTokenizer(Tokenizer):
    """Characters from training, with byte fallback for unseen ones."""

    kind = "char"

    def __init__(self, chars: Iterable[str], special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
        self.chars: tuple[str, ...] = tuple(chars)
        if any(len(c) != 1 for c in self.chars) or len(set(self.chars)) != len(self.chars):
            raise ConfigError("char tokenizer: chars must be distinct single characters")
        super().__init__([*_BYTES, *(c.encode("utf-8") for c in self.chars)], special_tokens)
        self._char_to_id = {c: 256 + k for k, c in enumerate(self.chars)}

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):  # iterating bytes or a list would "work" and give garbage
            raise encode_error(text, TypeError(type(text).__name__))
        lookup = self._char_to_id
        ids: list[int] = []
        try:
            for ch in text:
                i = lookup.get(ch)
                if i is None:
                    ids.extend(ch.encode("utf-8"))  # byte fallback: ids 0..255 are the byte values
                else:
                    ids.append(i)
        except (UnicodeEncodeError, TypeError) as e:
            raise encode_error(text, e) from e
        return ids

    def save(self, directory: Path) -> None:
        # The character list lives in the metadata file itself: one file, written atomically.
        self._write_meta(Path(directory), chars=list(self.chars))

    @classmethod
    def load(cls, directory: Path) -> CharTokenizer:
        meta = read_meta(directory)
        chars = meta.get("chars")
        if not isinstance(chars, list) or not all(isinstance(c, str) and len(c) == 1 for c in chars):
            raise DataError(f"{Path(directory) / META_FILE}: \"chars\" must be a list of single characters")
        try:
            tok = cls(chars, tuple(meta["special_tokens"]))
        except ConfigError as e:
            raise DataError(f"{Path(directory) / META_FILE}: {e}") from e
        check_special_ids(tok, meta, Path(directory) / META_FILE)
        return tok


def train_char(texts: Iterable[str], vocab_size: int) -> CharTokenizer:
    """The most frequent characters of ``texts``, as many as fit in ``vocab_size``
    (which counts the 256 byte-fallback ids and the special tokens too)."""
    room = vocab_size - 256 - len(SPECIAL_TOKENS)
    if room < 1:
        raise ConfigError(f"tokenizer.vocab_size: {vocab_size} is too small for a char tokenizer; it needs at "
                          f"least {256 + len(SPECIAL_TOKENS) + 1} (256 byte-fallback ids + "
                          f"{len(SPECIAL_TOKENS)} special tokens + 1 character)")
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    # Most frequent first; ties broken by code point so training is deterministic.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    return CharTokenizer(c for c, _ in ranked[:room])

