"""An imported Hugging Face byte-level BPE tokenizer (GPT-2, Llama 3, Qwen2, ...), kind ``hf``.

``chatforge import --hf`` keeps a checkpoint's own tokenizer, since its weights only
make sense with it. chatforge's id layout (``base.py``) holds: every id the HF
tokenizer has (its vocabulary and its own added tokens, such as GPT-2's
``<|endoftext|>`` or Qwen2's ``<|im_start|>``) is an ordinary token standing for a
fixed byte string, and chatforge's special tokens follow right after them. So
the chat template, the loss masks and every stage work unchanged; a model must
still learn the new special tokens (fine-tune it with ``chatforge finetune sft``).

Only *byte-level* BPE can be represented: each token must be a string in GPT-2's
ByteLevel alphabet so that decoding is joining bytes. SentencePiece-style
tokenizers (Llama 2, Mistral: ``▁`` word markers and ``<0xNN>`` byte fallback,
which decode with context-dependent spaces) are refused with that reason.

Encoding runs the HF tokenizer itself with ``encode_special_tokens``: text that
looks like a special token (ours or the original's) stays ordinary text, as for
every chatforge tokenizer. A Unicode normalizer in the original (Qwen2's NFC) is
kept: such text round-trips only once normalised.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from chatforge.errors import ChatforgeError, DataError
from chatforge.io import atomic_write
from chatforge.tokenizer.base import (
    META_FILE,
    SPECIAL_TOKENS,
    Tokenizer,
    check_special_ids,
    encode_error,
    read_meta,
)
from chatforge.tokenizer.bpe import _CHAR_TO_BYTE, read_hf_file

HF_FILE = "tokenizer.json"
_NORMALIZERS = (None, "NFC")  # normalizers whose output is still the text, for text already in that form


def check_byte_level(hf: HFTokenizer) -> None:
    """Raise ``ChatforgeError`` with the reason when ``hf`` is not a byte-level BPE tokenizer."""
    spec = json.loads(hf.to_str())
    model = spec.get("model") or {}
    problems = []
    if model.get("type") != "BPE":
        problems.append(f"its model is {model.get('type')!r}, not BPE")
    if model.get("byte_fallback"):
        problems.append("it uses byte_fallback (<0xNN> tokens: a SentencePiece-style tokenizer)")
    decoder = spec.get("decoder") or {}
    if decoder.get("type") != "ByteLevel":
        problems.append(f"its decoder is {decoder.get('type')!r}, not ByteLevel (so tokens are not plain byte strings)")
    norm = spec.get("normalizer")
    if (norm or {}).get("type") not in _NORMALIZERS:
        problems.append(f"its normalizer {norm.get('type')!r} changes text (only none or NFC are kept)")
    if problems:
        raise ChatforgeError("this Hugging Face tokenizer cannot be represented as a chatforge tokenizer (chatforge "
                             "decodes every token as a fixed byte string): " + "; ".join(problems))


class ImportedTokenizer(Tokenizer):
    """A byte-level BPE ``tokenizers.Tokenizer`` plus chatforge's special tokens after its ids."""

    kind = "hf"

    def __init__(self, hf_tokenizer: HFTokenizer, special_tokens: Sequence[str] = SPECIAL_TOKENS,
                 source: dict[str, Any] | None = None):
        check_byte_level(hf_tokenizer)
        special_tokens = tuple(special_tokens)
        vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
        n = len(vocab)
        if sorted(vocab.values()) != list(range(n)):
            raise ChatforgeError(f"the tokenizer's ids are not 0..{n - 1} without gaps")
        tail = sorted(vocab, key=vocab.__getitem__)[n - len(special_tokens):] if n >= len(special_tokens) else []
        if tail != list(special_tokens):  # a fresh import: append ours
            clash = [s for s in special_tokens if s in vocab]
            if clash:
                raise ChatforgeError(f"the tokenizer already has tokens named like chatforge's special tokens "
                                     f"({', '.join(clash)}) but not as its last ids; it cannot take chatforge's chat "
                                     "format")
            hf_tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
            vocab = hf_tokenizer.get_vocab(with_added_tokens=True)
            n = len(vocab)
        n_base = n - len(special_tokens)
        added = {i: t.content for i, t in hf_tokenizer.get_added_tokens_decoder().items()}
        by_id = sorted(vocab, key=vocab.__getitem__)
        base: list[bytes] = []
        for i, piece in enumerate(by_id[:n_base]):
            if i in added:  # the original's own added tokens: their text, as ordinary bytes
                base.append(added[i].encode("utf-8"))
                continue
            try:
                base.append(bytes(_CHAR_TO_BYTE[ch] for ch in piece))
            except KeyError:
                raise ChatforgeError(f"this Hugging Face tokenizer cannot be represented as a chatforge tokenizer: "
                                     f"token {piece!r} (id {i}) is not written in the ByteLevel alphabet") from None
        if list(by_id[n_base:]) != list(special_tokens):
            raise ChatforgeError(f"special tokens at ids {n_base}.. are {by_id[n_base:]}, expected {list(special_tokens)}")
        hf_tokenizer.encode_special_tokens = True  # not stored in tokenizer.json: set on every load
        super().__init__(base, special_tokens)
        self.hf_tokenizer = hf_tokenizer
        self.source: dict[str, Any] = dict(source or {})

    def encode(self, text: str) -> list[int]:
        try:
            if not isinstance(text, str):
                raise TypeError(f"expected str, got {type(text).__name__}")
            if not text.isascii():
                text.encode("utf-8")  # a lone surrogate: UnicodeEncodeError, reported clearly
            return self.hf_tokenizer.encode(text, add_special_tokens=False).ids
        except (TypeError, ValueError) as e:
            raise encode_error(text, e) from e

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        texts = list(texts)
        for text in texts:
            if not isinstance(text, str) or not text.isascii():
                return [self.encode(t) for t in texts]  # the careful path, with its errors
        return [e.ids for e in self.hf_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / META_FILE).unlink(missing_ok=True)  # incomplete until the metadata is written last
        with atomic_write(directory / HF_FILE) as f:
            f.write(self.hf_tokenizer.to_str(pretty=True))
        self._write_meta(directory, source=self.source)

    @classmethod
    def load(cls, directory: Path) -> ImportedTokenizer:
        directory = Path(directory)
        meta = read_meta(directory)
        path = directory / HF_FILE
        hf = read_hf_file(path)
        try:
            tok = cls(hf, tuple(meta["special_tokens"]), source=meta.get("source"))
        except ChatforgeError as e:
            raise DataError(f"{path}: {e}") from e
        check_special_ids(tok, meta, path)
        return tok
