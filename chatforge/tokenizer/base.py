"""The interface every tokenizer implements, the special tokens, and the metadata file.

All three kinds (``bpe``, ``byte``, ``char``) lay out their ids the same way:

    0 .. n_base-1            ordinary tokens, each standing for a fixed byte string
    n_base .. vocab_size-1   the special tokens, in the order of ``SPECIAL_TOKENS``

Because every ordinary token is a byte string, decoding is one rule for all kinds:
join the tokens' bytes and decode them as UTF-8. Special tokens are never produced
by ``encode``: text that merely looks like one (a user typing ``<|assistant|>``)
is encoded as ordinary bytes. Code inserts them on purpose with ``special_id``.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from chatforge import __version__
from chatforge.errors import ChatforgeError, DataError
from chatforge.io import write_json

# <|bos|> starts every document (and so separates them in a shard); <|pad|> fills
# batches; the role tokens open a chat turn and <|end|> closes it; the tool tokens
# wrap a tool call and its result. The reserved tokens keep room for later uses
# without changing the ids of a trained model.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<|bos|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|tool_call|>",
    "<|tool_result|>",
    *(f"<|reserved_{i}|>" for i in range(8)),
)

# The file that marks a directory as holding a chatforge tokenizer.
META_FILE = "chatforge_tokenizer.json"
META_FORMAT = "chatforge-tokenizer"
META_FORMAT_VERSION = 1


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses give the ordinary tokens' bytes and ``encode``."""

    kind: str = ""

    def __init__(self, base_tokens: Sequence[bytes], special_tokens: Sequence[str] = SPECIAL_TOKENS):
        if len(set(special_tokens)) != len(special_tokens):
            raise ChatforgeError(f"special tokens must be distinct, got {list(special_tokens)}")
        self._n_base = len(base_tokens)
        self._special_tokens = tuple(special_tokens)
        self._special_to_id = {name: self._n_base + k for k, name in enumerate(self._special_tokens)}
        # One bytes object per id: what the id decodes to. Special tokens decode to their name.
        self._token_bytes: list[bytes] = [*base_tokens, *(name.encode("utf-8") for name in self._special_tokens)]

    # ------------------------------------------------------------------ vocabulary

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included: ids are ``0 .. vocab_size - 1``."""
        return len(self._token_bytes)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Special token name -> id, in id order."""
        return dict(self._special_to_id)

    def special_id(self, name: str) -> int:
        """The id of a special token, e.g. ``special_id("<|user|>")``."""
        try:
            return self._special_to_id[name]
        except KeyError:
            raise ChatforgeError(
                f"unknown special token {name!r}; known: {', '.join(self._special_tokens)}"
            ) from None

    @property
    def bos_id(self) -> int:
        """<|bos|>: starts every document."""
        return self.special_id("<|bos|>")

    @property
    def pad_id(self) -> int:
        """<|pad|>: fills batches; never a training target."""
        return self.special_id("<|pad|>")

    @property
    def end_id(self) -> int:
        """<|end|>: ends a chat turn; generation stops on it."""
        return self.special_id("<|end|>")

    def is_special(self, i: int) -> bool:
        """Whether id ``i`` is one of the special tokens."""
        return self._n_base <= i < len(self._token_bytes)

    def token_bytes(self, i: int) -> bytes:
        """The bytes id ``i`` stands for (a special token's name for special ids)."""
        self._check_id(i)
        return self._token_bytes[i]

    def id_to_token(self, i: int) -> str:
        """A readable form of token ``i``: its text, with bytes that are not whole
        UTF-8 characters shown as ``\\xNN`` escapes."""
        return self.token_bytes(i).decode("utf-8", errors="backslashreplace")

    def _check_id(self, i: int) -> None:
        if not 0 <= i < len(self._token_bytes):
            raise ChatforgeError(f"token id {i} is out of range for this {self.kind} tokenizer "
                                 f"(vocab_size {len(self._token_bytes)})")

    # ------------------------------------------------------------------ encode / decode

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``. Never emits special ids."""

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """``[self.encode(t) for t in texts]``, faster where the kind allows."""
        return [self.encode(t) for t in texts]

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """The bytes the ids stand for; useful to decode a stream piece by piece."""
        if hasattr(ids, "tolist"):  # numpy arrays and torch tensors
            ids = ids.tolist()
        table = self._token_bytes
        try:
            out = b"".join([table[i] for i in ids])
        except (IndexError, TypeError):
            out = None
        if out is None or (ids and min(ids) < 0):
            bad = next((i for i in ids if not isinstance(i, int) or not 0 <= i < len(table)), None)
            raise ChatforgeError(f"cannot decode token id {bad!r}: ids must be integers in "
                                 f"[0, {len(table)}) for this {self.kind} tokenizer")
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """Text of the ids. Bytes that do not form valid UTF-8 (a sequence cut inside a
        character) become U+FFFD; the ids of any whole text decode back to it exactly."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ persistence

    @abstractmethod
    def save(self, directory: Path) -> None:
        """Write the tokenizer into ``directory`` (other files there are left alone)."""

    def _meta(self, **extra: Any) -> dict[str, Any]:
        return {
            "format": META_FORMAT,
            "format_version": META_FORMAT_VERSION,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "special_tokens": self.special_tokens,
            "chatforge_version": __version__,
            **extra,
        }

    def _write_meta(self, directory: Path, **extra: Any) -> None:
        # Written last by every save: a tokenizer directory is complete once it exists.
        write_json(Path(directory) / META_FILE, self._meta(**extra))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


def encode_error(text: Any, exc: Exception) -> ChatforgeError:
    """A clear error for text an encoder rejected: not a string, or not valid Unicode."""
    if not isinstance(text, str):
        return DataError(f"encode expects a str, got {type(text).__name__}")
    for pos, ch in enumerate(text):
        if 0xD800 <= ord(ch) <= 0xDFFF:
            return DataError(f"cannot encode text: lone surrogate U+{ord(ch):04X} at character {pos} "
                             "is not valid Unicode (decode the source with errors='replace' or clean it)")
    return DataError(f"cannot encode text: {exc}")


def read_meta(directory: Path) -> dict[str, Any]:
    """Read and check a tokenizer directory's metadata file."""
    directory = Path(directory)
    path = directory / META_FILE
    if not path.is_file():
        raise DataError(f"no tokenizer at {directory} (expected {META_FILE})")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: corrupt tokenizer metadata: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != META_FORMAT:
        raise DataError(f"{path}: not a chatforge tokenizer metadata file (missing \"format\": \"{META_FORMAT}\")")
    if meta.get("format_version") != META_FORMAT_VERSION:
        raise DataError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                        f"(this chatforge reads version {META_FORMAT_VERSION})")
    specials = meta.get("special_tokens")
    if not isinstance(specials, dict) or not all(isinstance(k, str) and isinstance(v, int) for k, v in specials.items()):
        raise DataError(f"{path}: \"special_tokens\" must map token names to ids")
    return meta


def check_special_ids(tok: Tokenizer, meta: dict[str, Any], path: Path) -> None:
    """The loaded tokenizer must give the ids the metadata promises."""
    if tok.special_tokens != meta["special_tokens"] or tok.vocab_size != meta.get("vocab_size"):
        raise DataError(f"{path}: metadata disagrees with the tokenizer files (vocab_size {meta.get('vocab_size')} "
                        f"vs {tok.vocab_size}, or special token ids differ); the directory is inconsistent, "
                        "train or save the tokenizer again")
