"""Tokenizers: byte-level BPE (the default), plain bytes, and characters, behind one interface.

    tok = train_tokenizer(texts, cfg.tokenizer)   # TokenizerConfig picks the kind and size
    tok.save(directory)
    tok = load_tokenizer(directory)               # whichever kind was saved there
    ids = tok.encode("Hello"); tok.decode(ids)

The id layout, the special tokens and the metadata file are described in ``base.py``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from chatforge.config import TokenizerConfig
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.tokenizer.base import META_FILE, SPECIAL_TOKENS, Tokenizer, check_special_ids, read_meta
from chatforge.tokenizer.bpe import BPETokenizer, train_bpe
from chatforge.tokenizer.byte import ByteTokenizer
from chatforge.tokenizer.char import CharTokenizer, train_char

__all__ = [
    "SPECIAL_TOKENS",
    "BPETokenizer",
    "ByteTokenizer",
    "CharTokenizer",
    "Tokenizer",
    "compression_report",
    "load_tokenizer",
    "train_tokenizer",
]

KINDS = ("bpe", "byte", "char")
_EMPTY = "no text to train the tokenizer on"


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train the tokenizer ``cfg.kind`` names on ``texts`` (streamed, read once).

    ``byte`` has nothing to learn and does not read ``texts``.
    """
    if cfg.kind == "byte":
        return ByteTokenizer()
    if cfg.kind == "bpe":
        return train_bpe(texts, cfg.vocab_size, cfg.min_frequency, cfg.max_train_mb, cfg.max_digits)
    if cfg.kind == "char":
        counter = _Counted(texts)
        tok = train_char(counter, cfg.vocab_size)
        if counter.chars == 0:
            raise DataError(_EMPTY)
        return tok
    raise ConfigError(f"tokenizer.kind: {cfg.kind!r} is not allowed; allowed: {', '.join(KINDS)}")


class _Counted:
    """Passes texts through, counting characters, so an empty corpus can be reported."""

    def __init__(self, texts: Iterable[str]):
        self.texts = texts
        self.chars = 0

    def __iter__(self) -> Iterator[str]:
        for k, text in enumerate(self.texts):
            if not isinstance(text, str):
                raise DataError(f"training text {k} is a {type(text).__name__}, not a str")
            self.chars += len(text)
            yield text


def load_tokenizer(directory: Path) -> Tokenizer:
    """Load the tokenizer saved in ``directory``, whatever its kind."""
    directory = Path(directory)
    if not directory.exists():
        raise ChatforgeError(f"no tokenizer at {directory}: the directory does not exist "
                             "(run `chatforge tokenizer train` first)")
    if not directory.is_dir():
        raise ChatforgeError(f"{directory} is not a tokenizer directory (it is a file); "
                             f"give the directory that holds {META_FILE}")
    meta = read_meta(directory)  # DataError (a ChatforgeError) naming the file when missing or corrupt
    kind = meta.get("kind")
    if kind == "bpe":
        return BPETokenizer.load(directory)
    if kind == "char":
        return CharTokenizer.load(directory)
    if kind == "byte":
        tok = ByteTokenizer(tuple(meta["special_tokens"]))
        check_special_ids(tok, meta, directory / META_FILE)
        return tok
    if kind == "hf":  # imported with a Hugging Face model (chatforge import --hf); never trained here
        from chatforge.tokenizer.hf import ImportedTokenizer

        return ImportedTokenizer.load(directory)
    raise DataError(f"{directory / META_FILE}: unknown tokenizer kind {kind!r} (known: {', '.join(KINDS)}, hf)")


def compression_report(tok: Tokenizer, texts: Iterable[str]) -> dict[str, Any]:
    """How well ``tok`` compresses ``texts``, against the plain byte tokenizer.

    ``bytes_per_token`` is the usual figure (GPT-4's tokenizer gets about 4 on English);
    ``ratio`` is how many times fewer tokens ``tok`` needs than one token per byte.
    """
    n_docs = n_bytes = n_chars = n_tokens = 0
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        n_tokens += sum(len(ids) for ids in tok.encode_batch(batch))
        batch.clear()

    for text in texts:
        if not isinstance(text, str):
            raise DataError(f"compression_report: text {n_docs} is a {type(text).__name__}, not a str")
        n_docs += 1
        n_bytes += len(text.encode("utf-8"))
        n_chars += len(text)
        batch.append(text)
        if len(batch) >= 512:
            flush()
    flush()
    # The byte tokenizer spends exactly one token per UTF-8 byte: no need to run it.
    byte_tokens = n_bytes
    return {
        "kind": tok.kind,
        "vocab_size": tok.vocab_size,
        "n_docs": n_docs,
        "bytes": n_bytes,
        "chars": n_chars,
        "tokens": n_tokens,
        "bytes_per_token": round(n_bytes / n_tokens, 4) if n_tokens else 0.0,
        "chars_per_token": round(n_chars / n_tokens, 4) if n_tokens else 0.0,
        "byte_tokens": byte_tokens,
        "byte_bytes_per_token": 1.0 if byte_tokens else 0.0,
        "ratio": round(byte_tokens / n_tokens, 4) if n_tokens else 0.0,
    }
