"""Shard: tokenise the clean corpus into memory-mapped token files, split by document.

On-disk format of one shard (``.bin``), version 1. All integers little-endian.

======  =====  ==========================================================
offset  size   field
======  =====  ==========================================================
0       8      magic ``b"CFSHARD\\0"`` (identifies a chatforge token shard)
8       4      format version, uint32 (currently 1)
12      4      dtype code, uint32: 1 = uint16 tokens, 2 = uint32 tokens
16      8      n_tokens, uint64: number of token ids after the header
24      8      vocab_size, uint64: every token id is < vocab_size
32      8      bos_id, uint64: the token that starts every document
40      216    reserved, zero
256     ...    n_tokens token ids of the dtype above
======  =====  ==========================================================

The dtype is uint16 while ``vocab_size <= 65536`` (half the disk and page cache of
uint32), else uint32. The header is 256 bytes so the token array starts aligned and
the format has room to grow; readers reject versions they do not know rather than
guess. A file's size must be exactly ``256 + n_tokens * itemsize``: anything else is
a truncated or corrupt shard.

``shard_corpus`` turns ``clean.jsonl`` into ``train_000.bin``, ``train_001.bin``, ...
and ``val.bin`` plus ``shards.json`` (what was written, with counts). Each document
goes wholly to one split, chosen from a hash of ``(seed, document id)``: a document
keeps its split when the corpus grows or is reordered, so the held-out set never
leaks into training. Every document is prefixed with the BOS token; the train split
is a single token stream cut into shard files of exactly ``shard_tokens`` tokens
(the last one shorter), so a document may continue from one train shard into the
next. The loader (``chatforge.data.loader``) reads the shards as one stream.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple, Protocol

import numpy as np

from chatforge.config import ShardConfig
from chatforge.errors import ConfigError, DataError
from chatforge.io import atomic_write, read_jsonl, write_json

MAGIC = b"CFSHARD\x00"
FORMAT_VERSION = 1
HEADER_BYTES = 256
# Fixed part of the header: magic, version, dtype code, n_tokens, vocab_size, bos_id.
_HEADER = struct.Struct("<8sIIQQQ")
_DTYPES: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
_DTYPE_CODES = {dt: code for code, dt in _DTYPES.items()}
MAX_VOCAB = 1 << 32

BATCH_DOCS = 512  # documents tokenised per encode_batch call
_TRAIN_NAME = "train_{:03d}.bin"
_TRAIN_RE = re.compile(r"train_\d+\.bin")
VAL_NAME = "val.bin"
SUMMARY_NAME = "shards.json"


class Tokenizer(Protocol):
    """What sharding needs from a tokenizer (``chatforge.tokenizer`` provides it)."""

    bos_id: int
    vocab_size: int

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...


class ShardHeader(NamedTuple):
    version: int
    dtype: np.dtype
    n_tokens: int
    vocab_size: int
    bos_id: int


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """The smallest token dtype that holds every id below ``vocab_size``."""
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, {MAX_VOCAB}]")
    return _DTYPES[1] if vocab_size <= 1 << 16 else _DTYPES[2]


def _pack_header(n_tokens: int, vocab_size: int, bos_id: int) -> bytes:
    dtype = dtype_for_vocab(vocab_size)
    fixed = _HEADER.pack(MAGIC, FORMAT_VERSION, _DTYPE_CODES[dtype], n_tokens, vocab_size, bos_id)
    return fixed.ljust(HEADER_BYTES, b"\x00")


def _check_vocab(where: str, vocab_size: int, bos_id: int) -> None:
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise DataError(f"{where}: vocab_size {vocab_size} must be in [1, {MAX_VOCAB}]")
    if not 0 <= bos_id < vocab_size:
        raise DataError(f"{where}: bos_id {bos_id} must be in [0, vocab_size={vocab_size})")


def _check_token_range(where: str, tokens: np.ndarray, vocab_size: int) -> None:
    if tokens.size == 0:
        return
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: token id {bad} is outside [0, vocab_size={vocab_size})")


# --------------------------------------------------------------------------- one shard


def write_shard(path: Path, tokens: np.ndarray, vocab_size: int, bos_id: int) -> None:
    """Write ``tokens`` (1-D, integer ids < ``vocab_size``) as one shard, atomically."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: tokens must be a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
    if tokens.size == 0:
        raise DataError(f"{path}: refusing to write a shard with no tokens")
    _check_vocab(str(path), vocab_size, bos_id)
    _check_token_range(str(path), tokens, vocab_size)
    dtype = dtype_for_vocab(vocab_size)
    with atomic_write(path, "wb") as f:
        f.write(_pack_header(tokens.size, vocab_size, bos_id))
        _write_tokens(f, tokens, dtype)


def _write_tokens(f: BinaryIO, tokens: np.ndarray, dtype: np.dtype, chunk: int = 1 << 22) -> None:
    # Converted in chunks so a large array is never copied whole.
    for start in range(0, tokens.size, chunk):
        f.write(np.ascontiguousarray(tokens[start : start + chunk], dtype=dtype).tobytes())


def read_header(path: Path) -> ShardHeader:
    """Read and validate a shard's header and its size; ``DataError`` says what is wrong."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise DataError(f"{path}: cannot read shard: {e.strerror or e}") from e
    if len(head) < len(MAGIC) and MAGIC.startswith(head):  # cut short inside the magic itself
        what = "empty file" if not head else f"truncated shard: only {size} bytes"
        raise DataError(f"{path}: {what}, not a complete chatforge token shard; re-run `chatforge data shard`")
    if head[: len(MAGIC)] != MAGIC:
        raise DataError(
            f"{path}: not a chatforge token shard (expected magic {MAGIC!r} at byte 0, "
            f"found {head[: len(MAGIC)]!r})"
        )
    if len(head) < HEADER_BYTES:
        raise DataError(f"{path}: truncated shard: {size} bytes, shorter than the {HEADER_BYTES}-byte header")
    _, version, code, n_tokens, vocab_size, bos_id = _HEADER.unpack_from(head)
    if version != FORMAT_VERSION:
        raise DataError(
            f"{path}: unknown shard format version {version} (this chatforge reads version {FORMAT_VERSION}); "
            "re-run `chatforge data shard` or upgrade chatforge"
        )
    if code not in _DTYPES:
        raise DataError(f"{path}: corrupt shard header: unknown dtype code {code} (known: 1=uint16, 2=uint32)")
    dtype = _DTYPES[code]
    if not 1 <= vocab_size <= MAX_VOCAB or not 0 <= bos_id < vocab_size:
        raise DataError(f"{path}: corrupt shard header: vocab_size {vocab_size}, bos_id {bos_id}")
    if dtype.itemsize < dtype_for_vocab(vocab_size).itemsize:
        raise DataError(f"{path}: corrupt shard header: dtype {dtype.name} cannot hold vocab_size {vocab_size}")
    expected = HEADER_BYTES + n_tokens * dtype.itemsize
    if size < expected:
        raise DataError(
            f"{path}: truncated shard: the header declares {n_tokens} tokens ({expected} bytes) "
            f"but the file has {size} bytes"
        )
    if size > expected:
        raise DataError(
            f"{path}: corrupt shard: {size - expected} unexpected bytes after the {n_tokens} tokens "
            "the header declares"
        )
    if n_tokens == 0:
        raise DataError(f"{path}: shard holds no tokens")
    return ShardHeader(version, dtype, n_tokens, vocab_size, bos_id)


def open_shard(path: Path) -> np.memmap:
    """The shard's tokens as a read-only memmap (no data is read until indexed)."""
    header = read_header(path)
    return np.memmap(path, dtype=header.dtype, mode="r", offset=HEADER_BYTES, shape=(header.n_tokens,))


def shard_info(path: Path) -> dict[str, Any]:
    """The validated header of a shard as a dict."""
    h = read_header(path)
    return {
        "path": str(path),
        "version": h.version,
        "dtype": h.dtype.name,
        "n_tokens": h.n_tokens,
        "vocab_size": h.vocab_size,
        "bos_id": h.bos_id,
        "header_bytes": HEADER_BYTES,
        "file_bytes": HEADER_BYTES + h.n_tokens * h.dtype.itemsize,
    }


def split_files(data_dir: Path, split: str) -> list[Path]:
    """The shard files of ``split`` ("train" or "val") listed in ``data_dir/shards.json``, in order."""
    data_dir = Path(data_dir)
    summary_path = data_dir / SUMMARY_NAME
    try:
        summary = json.loads(summary_path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise DataError(f"{summary_path}: not found; run `chatforge data shard` first") from e
    except (OSError, ValueError) as e:
        raise DataError(f"{summary_path}: unreadable shard summary: {e}") from e
    if split not in ("train", "val") or not isinstance(summary, dict) or split not in summary:
        raise DataError(f"{summary_path}: no split {split!r}; splits: train, val")
    try:
        names = [f["name"] for f in summary[split]["files"]]
    except (KeyError, TypeError) as e:
        raise DataError(f"{summary_path}: split {split!r} has no valid 'files' list of {{\"name\": ...}}") from e
    if not names or not all(isinstance(n, str) for n in names):
        raise DataError(f"{summary_path}: split {split!r} must list at least one shard file name (strings)")
    return [data_dir / n for n in names]


# --------------------------------------------------------------------------- writing a split


class _SplitWriter:
    """Streams a split's tokens into temp shard files, rolling over at ``max_tokens``.

    Headers are written with n_tokens = 0 and patched when a file is closed. Files
    stay under temporary names until ``commit``; ``abort`` removes them.
    """

    def __init__(self, out_dir: Path, names: Callable[[int], str], max_tokens: int | None, vocab_size: int, bos_id: int):
        self.out_dir = out_dir
        self.names = names  # file index -> final file name
        self.max_tokens = max_tokens
        self.vocab_size = vocab_size
        self.bos_id = bos_id
        self.dtype = dtype_for_vocab(vocab_size)
        self.done: list[tuple[str, Path, int]] = []  # (final name, temp path, n_tokens)
        self._file: BinaryIO | None = None
        self._tmp: Path | None = None
        self._count = 0

    @property
    def total_tokens(self) -> int:
        return sum(n for _, _, n in self.done) + self._count

    def write(self, tokens: np.ndarray) -> None:
        while tokens.size:
            if self._file is None:
                self._open()
            room = tokens.size if self.max_tokens is None else self.max_tokens - self._count
            piece, tokens = tokens[:room], tokens[room:]
            _write_tokens(self._file, piece, self.dtype)
            self._count += piece.size
            if self.max_tokens is not None and self._count >= self.max_tokens:
                self._close()

    def _open(self) -> None:
        name = self.names(len(self.done))
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=self.out_dir)
        self._file = os.fdopen(fd, "wb")
        self._tmp = Path(tmp)
        self._count = 0
        self._file.write(_pack_header(0, self.vocab_size, self.bos_id))

    def _close(self) -> None:
        assert self._file is not None and self._tmp is not None
        self._file.seek(0)
        self._file.write(_pack_header(self._count, self.vocab_size, self.bos_id))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self.done.append((self.names(len(self.done)), self._tmp, self._count))
        self._file, self._tmp, self._count = None, None, 0

    def finish(self) -> None:
        if self._file is not None and self._count:
            self._close()
        elif self._file is not None:  # opened but nothing written: drop it
            self._file.close()
            assert self._tmp is not None
            self._tmp.unlink()
            self._file, self._tmp = None, None

    def commit(self) -> list[dict[str, Any]]:
        for name, tmp, _ in self.done:
            os.replace(tmp, self.out_dir / name)
        return [{"name": name, "tokens": n} for name, _, n in self.done]

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
        for tmp in [t for _, t, _ in self.done] + ([self._tmp] if self._tmp else []):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()


# --------------------------------------------------------------------------- the corpus


def split_score(seed: int, doc_id: str) -> float:
    """A uniform number in [0, 1) fixed by ``(seed, doc_id)``; below val_fraction means val."""
    digest = hashlib.blake2b(f"{seed}\x00{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


class _Doc(NamedTuple):
    lineno: int
    text: str
    score: float


def _read_docs(clean_path: Path, seed: int) -> Iterator[_Doc]:
    """Yield ``_Doc`` per line of clean.jsonl; the document id falls back to its text."""
    for lineno, obj in read_jsonl(clean_path):
        if "text" not in obj:
            raise DataError(f"{clean_path}:{lineno}: missing field 'text'; fields present: {', '.join(obj) or '(none)'}")
        text = obj["text"]
        if not isinstance(text, str):
            raise DataError(f"{clean_path}:{lineno}: field 'text' must be a string, got {type(text).__name__}")
        doc_id = str(obj["id"]) if "id" in obj else "text:" + hashlib.sha256(text.encode()).hexdigest()
        yield _Doc(lineno, text, split_score(seed, doc_id))


def _flat_tokens(encoded: list[list[int]], bos_id: int) -> np.ndarray | None:
    """BOS + ids of each document, concatenated, as int64; None if some id is not an int64."""
    total = sum(len(ids) + 1 for ids in encoded)
    chained = itertools.chain.from_iterable(itertools.chain((bos_id,), ids) for ids in encoded)
    try:
        return np.fromiter(chained, dtype=np.int64, count=total)
    except (OverflowError, TypeError, ValueError):  # e.g. an id >= 2**63 or a non-number
        return None


def shard_corpus(clean_path: Path, tokenizer: Tokenizer, out_dir: Path, cfg: ShardConfig) -> dict[str, Any]:
    """Tokenise ``clean_path`` into ``out_dir/train_*.bin``, ``val.bin`` and ``shards.json``.

    Streams the corpus in batches of ``BATCH_DOCS`` documents (memory stays constant:
    a batch of text plus its tokens). All shards are written under temporary names and
    renamed into place only when the whole corpus is done, so a failure leaves the
    previous run's shards intact; train shards left by an earlier run with more shards
    are removed. Returns the summary written to ``shards.json``.

    If the hash split leaves one split empty (a tiny corpus), the document closest to
    the other side moves over, so both splits hold at least one document.
    """
    clean_path, out_dir = Path(clean_path), Path(out_dir)
    if not 0.0 < cfg.val_fraction < 1.0:
        raise ConfigError(f"shard.val_fraction: {cfg.val_fraction} must be in (0, 1)")
    if cfg.shard_tokens < 1:
        raise ConfigError(f"shard.shard_tokens: {cfg.shard_tokens} must be >= 1")
    vocab_size, bos_id = int(tokenizer.vocab_size), int(tokenizer.bos_id)
    _check_vocab(f"{clean_path}: tokenizer", vocab_size, bos_id)
    out_dir.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    result = _shard_pass(clean_path, tokenizer, out_dir, cfg, force_line=None)
    if result is None:  # one split came out empty: move the nearest document and redo
        forced = _nearest_to_empty_split(clean_path, cfg)
        result = _shard_pass(clean_path, tokenizer, out_dir, cfg, force_line=forced)
        assert result is not None
    train, val, docs = result
    try:
        train_files, val_files = train.commit(), val.commit()
    except BaseException:
        train.abort()
        val.abort()
        raise
    keep = {f["name"] for f in train_files}
    for stale in out_dir.iterdir():
        if _TRAIN_RE.fullmatch(stale.name) and stale.name not in keep:
            stale.unlink()
    seconds = time.perf_counter() - start
    total = train.total_tokens + val.total_tokens
    summary = {
        "format_version": FORMAT_VERSION,
        "source": str(clean_path),
        "dtype": dtype_for_vocab(vocab_size).name,
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "seed": cfg.seed,
        "val_fraction": cfg.val_fraction,
        "shard_tokens": cfg.shard_tokens,
        "train": {"files": train_files, "tokens": train.total_tokens, "docs": docs["train"]},
        "val": {"files": val_files, "tokens": val.total_tokens, "docs": docs["val"]},
        "seconds": round(seconds, 3),
        "tokens_per_second": round(total / seconds, 1) if seconds > 0 else None,
    }
    write_json(out_dir / SUMMARY_NAME, summary)
    return summary


def _shard_pass(
    clean_path: Path, tokenizer: Tokenizer, out_dir: Path, cfg: ShardConfig, force_line: tuple[int, str] | None
) -> tuple[_SplitWriter, _SplitWriter, dict[str, int]] | None:
    """One streaming pass; returns the finished (uncommitted) writers, or None if a split is empty.

    ``force_line`` = (line number, split) overrides the hash split for one document.
    """
    vocab_size, bos_id = int(tokenizer.vocab_size), int(tokenizer.bos_id)
    train = _SplitWriter(out_dir, _TRAIN_NAME.format, cfg.shard_tokens, vocab_size, bos_id)
    val = _SplitWriter(out_dir, lambda _: VAL_NAME, None, vocab_size, bos_id)
    docs = {"train": 0, "val": 0}
    try:
        batches = _batched(_read_docs(clean_path, cfg.seed), BATCH_DOCS)
        for batch in batches:
            encoded = tokenizer.encode_batch([d.text for d in batch])
            if len(encoded) != len(batch):
                raise DataError(
                    f"{clean_path}: tokenizer returned {len(encoded)} encodings for a batch of {len(batch)} documents"
                )
            in_val = [_goes_to_val(d, cfg.val_fraction, force_line) for d in batch]
            for split, writer, want in (("train", train, False), ("val", val, True)):
                chosen = [(d, ids) for d, ids, v in zip(batch, encoded, in_val) if v is want]
                if not chosen:
                    continue
                tokens = _flat_tokens([ids for _, ids in chosen], bos_id)
                if tokens is None or not _in_range(tokens, vocab_size):
                    _raise_bad_doc(clean_path, chosen, vocab_size)  # find and name the document at fault
                writer.write(tokens)
                docs[split] += len(chosen)
        n_docs = docs["train"] + docs["val"]
        if n_docs == 0:
            raise DataError(f"{clean_path}: the corpus is empty: no documents to shard")
        if n_docs < 2:
            raise DataError(
                f"{clean_path}: the corpus has {n_docs} document; sharding needs at least 2 "
                "(one for train, one for validation)"
            )
        train.finish()
        val.finish()
    except BaseException:
        train.abort()
        val.abort()
        raise
    if docs["train"] == 0 or docs["val"] == 0:
        train.abort()
        val.abort()
        return None
    return train, val, docs


def _goes_to_val(doc: _Doc, val_fraction: float, force_line: tuple[int, str] | None) -> bool:
    if force_line is not None and doc.lineno == force_line[0]:
        return force_line[1] == "val"
    return doc.score < val_fraction


def _nearest_to_empty_split(clean_path: Path, cfg: ShardConfig) -> tuple[int, str]:
    """(line, split) of the document to move: the lowest score goes to val, else the highest to train."""
    lowest = highest = None
    for doc in _read_docs(clean_path, cfg.seed):
        if lowest is None or doc.score < lowest.score:
            lowest = doc
        if highest is None or doc.score > highest.score:
            highest = doc
    assert lowest is not None and highest is not None
    if lowest.score >= cfg.val_fraction:  # nothing in val
        return lowest.lineno, "val"
    return highest.lineno, "train"


def _in_range(tokens: np.ndarray, vocab_size: int) -> bool:
    return tokens.size == 0 or (int(tokens.min()) >= 0 and int(tokens.max()) < vocab_size)


def _raise_bad_doc(clean_path: Path, chosen: list[tuple[_Doc, list[int]]], vocab_size: int) -> None:
    for doc, ids in chosen:
        where = f"{clean_path}:{doc.lineno}: tokenizer output"
        tokens = _flat_tokens([list(ids)], 0)
        if tokens is None:
            raise DataError(f"{where}: token ids must be integers in [0, vocab_size={vocab_size})")
        _check_token_range(where, tokens[1:], vocab_size)
    # Unreachable while bos_id is checked up front; kept so a bad batch can never pass silently.
    raise DataError(f"{clean_path}: tokenizer bos_id is outside [0, vocab_size={vocab_size})")


def _batched(items: Iterable[_Doc], n: int) -> Iterator[list[_Doc]]:
    it = iter(items)
    while batch := list(itertools.islice(it, n)):
        yield batch

