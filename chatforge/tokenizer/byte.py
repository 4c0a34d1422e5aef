"""The plain byte tokenizer: one id per UTF-8 byte, then the special tokens.

Nothing to train, nothing lost: any string round-trips. It is the baseline the
compression report measures other tokenizers against, and a fine choice for
very small corpora where a learned vocabulary would be mostly unseen tokens.
"""

from __future__ import annotations

from pathlib import Path

from chatforge.tokenizer.base import SPECIAL_TOKENS, Tokenizer, encode_error

# Byte values as one-byte strings, built once: id b stands for bytes([b]).
_BYTES = [bytes([b]) for b in range(256)]


class ByteTokenizer(Tokenizer):
    """ids 0..255 are the byte values; special tokens follow from 256."""

    kind = "byte"

    def __init__(self, special_tokens: tuple[str, ...] = SPECIAL_TOKENS):
        super().__init__(_BYTES, special_tokens)

    def encode(self, text: str) -> list[int]:
        try:
            return list(text.encode("utf-8"))
        except (UnicodeEncodeError, AttributeError) as e:
            raise encode_error(text, e) from e

    def save(self, directory: Path) -> None:
        self._write_meta(Path(directory))
