"""Byte-level BPE, trained and run by Hugging Face ``tokenizers`` (Rust).

Text is first split into pieces by the GPT-4 (cl100k) regex: words with their
leading space, runs of at most three digits, punctuation, whitespace. ``max_digits``
narrows the digit runs to two (nanochat's choice) or one (LLaMA's): with a small
vocabulary BPE learns only some 3-digit tokens, so "5955139" became ``5|95|5|13|9``
and a quarter of SupportWorld's order numbers repeat a token, which is what makes
in-context copying slip (an induction head matches on the previous token); two-digit
runs are all learned and the same numbers read ``59|55|13|9``. Each piece
is then turned into bytes (the ByteLevel step maps every byte to a printable
character, the GPT-2 trick) and BPE merges are applied inside the piece only.
Because the 256 byte values are all in the vocabulary, any string encodes, and
the ids decode back to it exactly.

The same vocabulary is exposed to ``tiktoken`` by ``to_tiktoken``: an id's rank is
the id itself, which is the order in which the trainer learned the merges, and
that is what tiktoken's merge-by-rank rule needs to reproduce the HF encoding.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.io import atomic_write
from chatforge.tokenizer.base import (
    META_FILE,
    SPECIAL_TOKENS,
    Tokenizer,
    check_special_ids,
    encode_error,
    read_meta,
)

if TYPE_CHECKING:
    import tiktoken

HF_FILE = "tokenizer.json"

# GPT-4's split pattern as tiktoken ships it for cl100k_base, written so that
# Oniguruma (the regex engine of HF tokenizers) reads it as tiktoken's engine does:
# - ``\p{N}{1,3}+`` becomes ``\p{N}{1,3}``: Oniguruma reads ``{1,3}+`` as "one or more
#   runs of 1-3 digits" (so any number of digits), not as possessive. Nothing follows
#   it in its branch, so dropping the possessive changes nothing for tiktoken.
# - ``\s++$`` becomes ``\s++\z``: ``$`` is end of line in Oniguruma but end of text in
#   tiktoken. After the possessive ``\s++`` (which eats any newline) they happen to
#   agree; ``\z`` means end of text in both, so nobody has to re-derive that.
PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++\z|\s*[\r\n]|\s+(?!\S)|\s"""
)
MAX_DIGITS = (1, 2, 3)  # the digit-run lengths ``pattern`` offers; 3 is cl100k's


def pattern(max_digits: int = 3) -> str:
    """The split pattern with digit runs of at most ``max_digits`` (3 gives ``PATTERN``)."""
    if max_digits not in MAX_DIGITS:
        raise ConfigError(f"tokenizer.max_digits: {max_digits!r} is not allowed; allowed: "
                          f"{', '.join(map(str, MAX_DIGITS))}")
    return PATTERN.replace(r"\p{N}{1,3}", rf"\p{{N}}{{1,{max_digits}}}")

TRAIN_BATCH_DOCS = 1000  # texts handed to the Rust trainer per Python call


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, the alphabet of ByteLevel tokens.

    Printable Latin-1 bytes stand for themselves; the rest (controls, space, ...) are
    shifted to code points from 256 on, so every token is a readable string.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


_CHAR_TO_BYTE = {ch: b for b, ch in _bytes_to_unicode().items()}


def _pre_tokenizer(pat: str = PATTERN) -> pre_tokenizers.PreTokenizer:
    # use_regex=False: the Split step above already did the splitting; ByteLevel only maps bytes.
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pat), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _empty_hf_tokenizer(pat: str = PATTERN) -> HFTokenizer:
    # ignore_merges: a piece that is itself in the vocabulary becomes that one token,
    # without replaying merges. tiktoken does the same, so the two agree on every piece.
    hf = HFTokenizer(models.BPE(ignore_merges=True))
    hf.pre_tokenizer = _pre_tokenizer(pat)
    hf.decoder = decoders.ByteLevel()
    return hf


def _check_pipeline(hf: HFTokenizer) -> str:
    """Refuse an HF tokenizer whose pipeline is not the one this class assumes:
    ``to_tiktoken`` and the byte table would silently disagree with ``encode``.
    Returns its split pattern (one of ``pattern(n)``)."""
    spec = json.loads(hf.to_str())
    known = {}
    for n in MAX_DIGITS:
        pat = pattern(n)
        known[pat] = json.loads(_empty_hf_tokenizer(pat).to_str())["pre_tokenizer"]
    found = next((pat for pat, pre in known.items() if spec.get("pre_tokenizer") == pre), None)
    model = spec.get("model") or {}
    problems = []
    if spec.get("normalizer") is not None:
        problems.append("it has a normalizer")
    if found is None:
        problems.append("its pre_tokenizer is not the cl100k Split + ByteLevel sequence")
    if model.get("type") != "BPE":
        problems.append(f"its model is {model.get('type')!r}, not BPE")
    else:
        for key, want in (("ignore_merges", True), ("byte_fallback", False), ("dropout", None),
                          ("continuing_subword_prefix", None), ("end_of_word_suffix", None)):
            if model.get(key, want) != want:
                problems.append(f"model.{key} is {model.get(key)!r}, expected {want!r}")
    if problems:
        raise ChatforgeError("not a chatforge byte-level BPE tokenizer: " + "; ".join(problems))
    assert found is not None
    return found


def _check_unicode(text: str) -> None:
    """TypeError for a non-str, ValueError (UnicodeEncodeError) for a lone surrogate."""
    if not isinstance(text, str):
        raise TypeError(f"expected str, got {type(text).__name__}")
    if not text.isascii():
        text.encode("utf-8")


def read_hf_file(path: Path) -> HFTokenizer:
    """A ``tokenizers`` tokenizer from its ``tokenizer.json``; a missing or corrupt file is a DataError."""
    if not path.is_file():
        raise DataError(f"{path}: missing; the tokenizer directory is incomplete (train or save it again)")
    try:
        return HFTokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception for any parse error
        raise DataError(f"{path}: corrupt tokenizer file: {e}") from e


class BPETokenizer(Tokenizer):
    """Byte-level BPE with the cl100k split; ids: merged vocabulary first, then the specials."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: HFTokenizer, special_tokens: Sequence[str] = SPECIAL_TOKENS,
                 train_info: dict[str, Any] | None = None):
        """Wrap a trained HF tokenizer. Special tokens are appended to it if it has none;
        otherwise they must already sit right after the ordinary vocabulary, in order."""
        self.pattern = _check_pipeline(hf_tokenizer)
        vocab = hf_tokenizer.get_vocab(with_added_tokens=False)
        n_base = len(vocab)
        base: list[bytes | None] = [None] * n_base
        for piece, i in vocab.items():
            if not 0 <= i < n_base or base[i] is not None:
                raise ChatforgeError(f"BPE vocabulary ids must be 0..{n_base - 1} without gaps; got id {i}")
            try:
                base[i] = bytes(_CHAR_TO_BYTE[ch] for ch in piece)
            except KeyError:
                raise ChatforgeError(f"BPE token {piece!r} (id {i}) is not written in the ByteLevel alphabet") from None
        missing = set(range(256)) - {b[0] for b in base if b is not None and len(b) == 1}
        if missing:
            # Without every single byte some text could not be encoded at all.
            raise ChatforgeError(f"BPE vocabulary lacks {len(missing)} of the 256 single-byte tokens "
                                 f"(e.g. byte {min(missing)}); train it with the full byte alphabet")

        if not hf_tokenizer.get_added_tokens_decoder():
            # normalized=False: match the raw text; special=True: HF tools treat them as control tokens.
            hf_tokenizer.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in special_tokens])
        added = {tok.content: i for i, tok in hf_tokenizer.get_added_tokens_decoder().items()}
        expected = {name: n_base + k for k, name in enumerate(special_tokens)}
        if added != expected:
            raise ChatforgeError(f"special tokens in the BPE file {added} do not match the expected ids {expected}")
        # Text that merely looks like a special token is encoded as ordinary bytes. This flag is
        # not stored in tokenizer.json, so it is set here, on every construction and load.
        hf_tokenizer.encode_special_tokens = True

        super().__init__(base, special_tokens)  # type: ignore[arg-type]  # every slot was filled above
        self.hf_tokenizer = hf_tokenizer
        self.train_info: dict[str, Any] = dict(train_info or {})
        self._tiktoken: Any = None  # built on first encode; False when tiktoken is not installed

    # ------------------------------------------------------------------ encode

    def encode(self, text: str) -> list[int]:
        encoder = self._fast_encoder()
        try:
            if encoder is not None:
                _check_unicode(text)  # tiktoken would silently replace a lone surrogate
                return encoder.encode_ordinary(text)
            return self.encode_hf(text)
        except (TypeError, ValueError) as e:  # not a str, or a lone surrogate
            raise encode_error(text, e) from e

    def encode_hf(self, text: str) -> list[int]:
        """Encode with the HF tokenizer itself (the reference the tiktoken fast path must equal)."""
        return self.hf_tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Encode many texts at once, in parallel across cores."""
        texts = list(texts)
        encoder = self._fast_encoder()
        try:
            if encoder is not None:
                for text in texts:
                    _check_unicode(text)
                return encoder.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
            return [enc.ids for enc in self.hf_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
        except (TypeError, ValueError) as e:
            for k, text in enumerate(texts):  # find the culprit so the message can point at it
                try:
                    self.encode(text)
                except DataError as bad:
                    raise DataError(f"text {k} of the batch: {bad}") from e
            raise DataError(f"cannot encode batch: {e}") from e

    def _fast_encoder(self) -> tiktoken.Encoding | None:
        """tiktoken with this vocabulary, when installed: it produces exactly the HF ids
        (tested) about twice as fast, so training uses HF and encoding uses tiktoken."""
        if self._tiktoken is False:
            return None
        if self._tiktoken is None:
            try:
                self._tiktoken = self.to_tiktoken()
            except ChatforgeError:
                self._tiktoken = False
                return None
        return self._tiktoken

    # ------------------------------------------------------------------ tiktoken

    def to_tiktoken(self) -> tiktoken.Encoding:
        """The same tokenizer as a ``tiktoken.Encoding``: ``encode_ordinary(s) == encode(s)``."""
        try:
            import tiktoken
        except ImportError as e:
            raise ChatforgeError("to_tiktoken needs the tiktoken package: pip install tiktoken "
                                 "(it comes with chatforge's dev extra)") from e
        ranks = {self._token_bytes[i]: i for i in range(self._n_base)}
        return tiktoken.Encoding(
            name=f"chatforge_bpe_{self.vocab_size}",
            pat_str=self.pattern,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
            explicit_n_vocab=self.vocab_size,
        )

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        # Remove the old metadata first: until the new one is written, the directory does not
        # pass for a complete tokenizer, so a crash mid-save cannot pair new and old files.
        (directory / META_FILE).unlink(missing_ok=True)
        with atomic_write(directory / HF_FILE) as f:
            f.write(self.hf_tokenizer.to_str(pretty=True))
        self._write_meta(directory, pattern=self.pattern, train=self.train_info)

    @classmethod
    def load(cls, directory: Path) -> BPETokenizer:
        directory = Path(directory)
        meta = read_meta(directory)
        path = directory / HF_FILE
        hf = read_hf_file(path)
        try:
            tok = cls(hf, tuple(meta["special_tokens"]), train_info=meta.get("train"))
        except ChatforgeError as e:
            raise DataError(f"{path}: {e}") from e
        if meta.get("pattern", PATTERN) != tok.pattern:
            raise DataError(f"{directory / META_FILE}: \"pattern\" differs from the split pattern of {path}; "
                            "the two files do not belong together (or an incompatible version made them)")
        check_special_ids(tok, meta, path)
        return tok


# --------------------------------------------------------------------------- training


class _TrainFeed:
    """Streams training texts to the trainer in batches, stopping at the byte cap.

    It counts what it hands over: the caller records it and detects an empty corpus.
    Errors raised while reading (a malformed JSONL line upstream) pass through the
    Rust trainer unchanged.
    """

    def __init__(self, texts: Iterable[str], max_bytes: int):
        self.texts = texts
        self.max_bytes = max_bytes  # 0 = no cap
        self.docs = 0
        self.bytes = 0
        self.capped = False

    def _texts(self) -> Iterator[str]:
        for k, text in enumerate(self.texts):
            if not isinstance(text, str):
                raise DataError(f"training text {k} is a {type(text).__name__}, not a str")
            try:
                data = text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(f"training text {k}: {encode_error(text, e)}") from e
            room = self.max_bytes - self.bytes
            if self.max_bytes and len(data) > room:
                self.capped = True
                if room == 0:
                    return
                # Cut the last text at the cap (dropping a character split by the cut).
                data = data[:room]
                text = data.decode("utf-8", errors="ignore")
                data = text.encode("utf-8")
            self.docs += 1
            self.bytes += len(data)
            yield text
            if self.capped:
                return

    def batches(self) -> Iterator[list[str]]:
        texts = self._texts()
        while batch := list(itertools.islice(texts, TRAIN_BATCH_DOCS)):
            yield batch


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, max_train_mb: float = 0.0,
              max_digits: int = 3) -> BPETokenizer:
    """Learn merges on ``texts`` until the vocabulary (256 bytes + merges + special tokens)
    reaches ``vocab_size``; a small corpus can run out of pairs first, giving fewer ids.
    Only the first ``max_train_mb`` megabytes (10^6 bytes) of text are used when it is > 0.
    Digits are split into runs of at most ``max_digits`` before merging."""
    n_base = vocab_size - len(SPECIAL_TOKENS)
    if n_base < 256:
        raise ConfigError(f"tokenizer.vocab_size: {vocab_size} is too small for bpe; it needs at least "
                          f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if min_frequency < 1:
        raise ConfigError(f"tokenizer.min_frequency: {min_frequency} must be >= 1")
    if max_train_mb < 0:
        raise ConfigError(f"tokenizer.max_train_mb: {max_train_mb} must be >= 0 (0 = no cap)")
    hf = _empty_hf_tokenizer(pattern(max_digits))
    trainer = trainers.BpeTrainer(
        vocab_size=n_base,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        special_tokens=[],  # added after training, so they get the ids after the vocabulary
        show_progress=False,
    )
    feed = _TrainFeed(texts, int(max_train_mb * 1e6))
    hf.train_from_iterator(feed.batches(), trainer)
    if feed.bytes == 0:
        raise DataError("no text to train the tokenizer on")
    info = {"docs": feed.docs, "bytes": feed.bytes, "capped": feed.capped,
            "min_frequency": min_frequency, "max_train_mb": max_train_mb, "max_digits": max_digits}
    return BPETokenizer(hf, SPECIAL_TOKENS, train_info=info)
