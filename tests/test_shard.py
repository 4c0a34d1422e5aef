"""Shards: the on-disk format, its validation, and tokenising a corpus into train/val splits."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from chatforge.config import ShardConfig
from chatforge.data import shard as shard_mod
from chatforge.data.shard import (
    HEADER_BYTES,
    MAGIC,
    dtype_for_vocab,
    open_shard,
    read_header,
    shard_corpus,
    shard_info,
    split_files,
    split_score,
    write_shard,
)
from chatforge.errors import ConfigError, DataError


class ByteTokenizer:
    """Tokens are the UTF-8 bytes of the text; BOS is 256, so documents split back unambiguously."""

    vocab_size = 300
    bos_id = 256

    def __init__(self):
        self.calls = 0

    def encode_batch(self, texts):
        self.calls += 1
        return [list(t.encode("utf-8")) for t in texts]


def write_corpus(path: Path, docs, extra_lines=()):
    """docs: iterable of (id, text); extra_lines: (index, raw line) inserted before that doc."""
    lines = [json.dumps({"id": i, "text": t, "source": "test"}) for i, t in docs]
    for at, raw in sorted(extra_lines, reverse=True):
        lines.insert(at, raw)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def make_docs(n, start=0):
    # Texts of varied length that name their id, so a decoded document tells which one it was.
    return [(f"d{i}", f"document {i}: " + "abc " * (i % 7)) for i in range(start, start + n)]


def stream_of(out_dir: Path, split: str) -> np.ndarray:
    files = split_files(out_dir, split)
    return np.concatenate([np.asarray(open_shard(f)) for f in files]).astype(np.int64)


def decode_docs(tokens: np.ndarray, bos: int = 256) -> list[str]:
    """Cut a stream at BOS tokens; the stream must start with BOS."""
    assert tokens.size and tokens[0] == bos
    cuts = np.flatnonzero(tokens == bos).tolist() + [tokens.size]
    return [bytes(tokens[a + 1 : b].astype(np.uint8)).decode("utf-8") for a, b in zip(cuts, cuts[1:])]


def split_of_texts(out_dir: Path) -> dict[str, str]:
    out = {}
    for split in ("train", "val"):
        for text in decode_docs(stream_of(out_dir, split)):
            assert text not in out, f"document {text!r} appears twice"
            out[text] = split
    return out


# --------------------------------------------------------------------------- one shard


def test_header_round_trip(tmp_path):
    path = tmp_path / "a.bin"
    tokens = np.array([5, 0, 299, 17, 256], dtype=np.int64)
    write_shard(path, tokens, vocab_size=300, bos_id=256)
    h = read_header(path)
    assert (h.version, h.n_tokens, h.vocab_size, h.bos_id) == (1, 5, 300, 256)
    assert h.dtype == np.dtype("<u2")
    assert path.stat().st_size == HEADER_BYTES + 5 * 2
    assert path.read_bytes()[:8] == MAGIC
    m = open_shard(path)
    assert isinstance(m, np.memmap)
    assert m.tolist() == tokens.tolist()
    info = shard_info(path)
    assert info["n_tokens"] == 5 and info["dtype"] == "uint16" and info["file_bytes"] == path.stat().st_size


@pytest.mark.parametrize(
    ("vocab_size", "dtype", "itemsize"),
    [(1, "uint16", 2), (300, "uint16", 2), (65536, "uint16", 2), (65537, "uint32", 4), (200_000, "uint32", 4)],
)
def test_dtype_chosen_by_vocab_size(tmp_path, vocab_size, dtype, itemsize):
    assert dtype_for_vocab(vocab_size).name == dtype
    path = tmp_path / "s.bin"
    top = vocab_size - 1
    write_shard(path, np.array([0, top, top], dtype=np.int64), vocab_size=vocab_size, bos_id=0)
    assert path.stat().st_size == HEADER_BYTES + 3 * itemsize
    assert open_shard(path).dtype.name == dtype
    assert open_shard(path).tolist() == [0, top, top]  # the largest id survives the round trip


@pytest.mark.parametrize("bad", [300, 65535, -1])
def test_token_out_of_range_is_rejected(tmp_path, bad):
    path = tmp_path / "s.bin"
    with pytest.raises(DataError, match=rf"s\.bin.*token id {bad} is outside \[0, vocab_size=300\)"):
        write_shard(path, np.array([1, bad, 2]), vocab_size=300, bos_id=0)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind either


def test_write_shard_rejects_bad_arguments(tmp_path):
    path = tmp_path / "s.bin"
    with pytest.raises(DataError, match="no tokens"):
        write_shard(path, np.array([], dtype=np.int64), vocab_size=300, bos_id=0)
    with pytest.raises(DataError, match="1-D integer"):
        write_shard(path, np.zeros((2, 2), dtype=np.int64), vocab_size=300, bos_id=0)
    with pytest.raises(DataError, match="1-D integer"):
        write_shard(path, np.array([0.5]), vocab_size=300, bos_id=0)
    with pytest.raises(DataError, match="bos_id 300"):
        write_shard(path, np.array([1]), vocab_size=300, bos_id=300)
    assert not path.exists()


def _good_shard(tmp_path) -> Path:
    path = tmp_path / "good.bin"
    write_shard(path, np.arange(10), vocab_size=300, bos_id=256)
    return path


def _patch(path: Path, offset: int, fmt: str, value) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda p: p.write_bytes(b"NOTSHARD" + p.read_bytes()[8:]), "not a chatforge token shard"),
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(MAGIC[:5]), "truncated"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "shorter than the 256-byte header"),
        (lambda p: p.write_bytes(p.read_bytes()[:-3]), "truncated shard: the header declares 10 tokens"),
        (lambda p: p.write_bytes(p.read_bytes() + b"\x00\x00"), "2 unexpected bytes"),
        (lambda p: _patch(p, 8, "<I", 99), "unknown shard format version 99"),
        (lambda p: _patch(p, 12, "<I", 7), "unknown dtype code 7"),
        (lambda p: _patch(p, 16, "<Q", 11), "declares 11 tokens"),
        (lambda p: _patch(p, 24, "<Q", 0), "corrupt shard header: vocab_size 0"),
        (lambda p: _patch(p, 24, "<Q", 70_000), "cannot hold vocab_size 70000"),
        (lambda p: _patch(p, 32, "<Q", 300), "bos_id 300"),
    ],
)
def test_corrupt_shard_raises_data_error_naming_the_file(tmp_path, corrupt, message):
    path = _good_shard(tmp_path)
    corrupt(path)
    with pytest.raises(DataError, match=message) as err:
        open_shard(path)
    assert str(path) in str(err.value)


def test_missing_shard_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"nope\.bin: cannot read shard"):
        read_header(tmp_path / "nope.bin")


def test_split_files_errors(tmp_path):
    with pytest.raises(DataError, match=r"shards\.json: not found; run `chatforge data shard`"):
        split_files(tmp_path, "train")
    (tmp_path / "shards.json").write_text("{not json")
    with pytest.raises(DataError, match="unreadable shard summary"):
        split_files(tmp_path, "train")
    (tmp_path / "shards.json").write_text(json.dumps({"train": {"nofiles": []}}))
    with pytest.raises(DataError, match=r"shards\.json.*'train'"):
        split_files(tmp_path, "train")
    with pytest.raises(DataError, match="no split 'test'"):
        split_files(tmp_path, "test")


# --------------------------------------------------------------------------- the corpus


def test_every_document_lands_in_exactly_one_split_with_bos(tmp_path):
    docs = make_docs(300)
    clean = write_corpus(tmp_path / "clean.jsonl", docs)
    cfg = ShardConfig(val_fraction=0.2, shard_tokens=1_000_000, seed=7)
    summary = shard_corpus(clean, ByteTokenizer(), tmp_path / "data", cfg)

    where = split_of_texts(tmp_path / "data")  # also checks no document appears twice
    assert sorted(where) == sorted(t for _, t in docs)
    # The split is exactly the hash rule: val iff score(seed, id) < val_fraction.
    for doc_id, text in docs:
        assert where[text] == ("val" if split_score(7, doc_id) < 0.2 else "train")
    n_val = sum(s == "val" for s in where.values())
    assert 20 < n_val < 100  # about 20% of 300
    assert summary["val"]["docs"] == n_val and summary["train"]["docs"] == 300 - n_val

    # Total tokens: one BOS plus the bytes of each document, split between the two sides.
    expected = sum(len(t.encode()) + 1 for _, t in docs)
    assert summary["train"]["tokens"] + summary["val"]["tokens"] == expected
    assert stream_of(tmp_path / "data", "train").size == summary["train"]["tokens"]
    assert stream_of(tmp_path / "data", "val").size == summary["val"]["tokens"]
    n_bos = sum(int((stream_of(tmp_path / "data", s) == 256).sum()) for s in ("train", "val"))
    assert n_bos == len(docs)

    on_disk = json.loads((tmp_path / "data" / "shards.json").read_text())
    assert on_disk == summary
    assert summary["dtype"] == "uint16" and summary["vocab_size"] == 300 and summary["bos_id"] == 256


def test_split_depends_only_on_document_id(tmp_path):
    cfg = ShardConfig(val_fraction=0.25, shard_tokens=1_000_000, seed=3)
    docs = make_docs(200)
    shard_corpus(write_corpus(tmp_path / "a.jsonl", docs), ByteTokenizer(), tmp_path / "a", cfg)
    # Reordered, with other documents mixed in: every original document keeps its split.
    others = make_docs(150, start=1000)
    mixed = list(reversed(docs))[:120] + others + list(reversed(docs))[120:]
    shard_corpus(write_corpus(tmp_path / "b.jsonl", mixed), ByteTokenizer(), tmp_path / "b", cfg)
    a, b = split_of_texts(tmp_path / "a"), split_of_texts(tmp_path / "b")
    assert {t: a[t] for t in a} == {t: b[t] for t in a}
    # Same input twice: byte-identical shards.
    shard_corpus(write_corpus(tmp_path / "a.jsonl", docs), ByteTokenizer(), tmp_path / "a2", cfg)
    for name in ("train_000.bin", "val.bin"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "a2" / name).read_bytes()
    # A different seed gives a different split.
    shard_corpus(tmp_path / "a.jsonl", ByteTokenizer(), tmp_path / "c", ShardConfig(0.25, 1_000_000, seed=4))
    assert split_of_texts(tmp_path / "c") != a


def test_document_without_id_is_split_by_its_text(tmp_path):
    clean = tmp_path / "clean.jsonl"
    texts = [f"text number {i}" for i in range(60)]
    clean.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = ShardConfig(val_fraction=0.3, shard_tokens=10_000, seed=1)
    shard_corpus(clean, ByteTokenizer(), tmp_path / "a", cfg)
    clean.write_text("".join(json.dumps({"text": t}) + "\n" for t in reversed(texts)))
    shard_corpus(clean, ByteTokenizer(), tmp_path / "b", cfg)
    assert split_of_texts(tmp_path / "a") == split_of_texts(tmp_path / "b")


def test_rollover_makes_several_train_files(tmp_path):
    docs = make_docs(200)
    clean = write_corpus(tmp_path / "clean.jsonl", docs)
    cfg = ShardConfig(val_fraction=0.1, shard_tokens=1000, seed=0)
    summary = shard_corpus(clean, ByteTokenizer(), tmp_path / "data", cfg)
    files = summary["train"]["files"]
    assert len(files) == -(-summary["train"]["tokens"] // 1000) >= 3
    assert [f["name"] for f in files] == [f"train_{i:03d}.bin" for i in range(len(files))]
    assert all(f["tokens"] == 1000 for f in files[:-1]) and 0 < files[-1]["tokens"] <= 1000
    for f in files:
        assert read_header(tmp_path / "data" / f["name"]).n_tokens == f["tokens"]
    # The val split is never cut, and documents continue across train files.
    assert [f["name"] for f in summary["val"]["files"]] == ["val.bin"]
    assert len(decode_docs(stream_of(tmp_path / "data", "train"))) == summary["train"]["docs"]


def test_rollover_exactly_at_a_document_boundary_leaves_no_empty_file(tmp_path):
    # 9 documents of 9 bytes + BOS = 10 tokens each; every id below goes to train.
    ids = [i for i in range(1000) if split_score(0, f"x{i}") >= 0.5][:9]
    docs = [(f"x{i}", f"{i:09d}"[-9:]) for i in ids]
    extra_val = next(i for i in range(1000) if split_score(0, f"x{i}") < 0.5)
    docs.append((f"x{extra_val}", "v"))
    summary = shard_corpus(write_corpus(tmp_path / "c.jsonl", docs), ByteTokenizer(), tmp_path / "d",
                           ShardConfig(val_fraction=0.5, shard_tokens=30, seed=0))
    assert [f["tokens"] for f in summary["train"]["files"]] == [30, 30, 30]
    assert sorted(p.name for p in (tmp_path / "d").glob("train_*.bin")) == ["train_000.bin", "train_001.bin",
                                                                            "train_002.bin"]


def test_uint32_shards_for_a_large_vocabulary(tmp_path):
    class BigTokenizer(ByteTokenizer):
        vocab_size = 70_000
        bos_id = 69_999

        def encode_batch(self, texts):
            return [[66_000 + b for b in t.encode()] for t in texts]

    summary = shard_corpus(write_corpus(tmp_path / "c.jsonl", make_docs(40)), BigTokenizer(), tmp_path / "d",
                           ShardConfig(val_fraction=0.2, shard_tokens=10_000, seed=0))
    assert summary["dtype"] == "uint32"
    train = stream_of(tmp_path / "d", "train")
    assert train[0] == 69_999 and train.max() == 69_999 and train.min() >= 66_000


def test_stale_shards_from_a_bigger_run_are_removed(tmp_path):
    clean = write_corpus(tmp_path / "clean.jsonl", make_docs(200))
    out = tmp_path / "data"
    first = shard_corpus(clean, ByteTokenizer(), out, ShardConfig(val_fraction=0.1, shard_tokens=500, seed=0))
    assert len(first["train"]["files"]) >= 5
    (out / "notes.txt").write_text("keep me")
    second = shard_corpus(clean, ByteTokenizer(), out, ShardConfig(val_fraction=0.1, shard_tokens=2000, seed=0))
    names = sorted(p.name for p in out.iterdir())
    expected = sorted([f["name"] for f in second["train"]["files"]] + ["val.bin", "shards.json", "notes.txt"])
    assert names == expected  # no stale train shard, no temp file; unrelated files untouched
    assert len(second["train"]["files"]) < len(first["train"]["files"])
    assert [p.name for p in split_files(out, "train")] == [f["name"] for f in second["train"]["files"]]


def test_failed_run_leaves_previous_shards_intact(tmp_path):
    out = tmp_path / "data"
    cfg = ShardConfig(val_fraction=0.1, shard_tokens=800, seed=0)
    good = write_corpus(tmp_path / "good.jsonl", make_docs(100))
    shard_corpus(good, ByteTokenizer(), out, cfg)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    # A bigger corpus, malformed after more than one encode batch: temp shards exist when it fails.
    bad = write_corpus(tmp_path / "bad.jsonl", make_docs(shard_mod.BATCH_DOCS + 100), [(550, "{broken")])
    with pytest.raises(DataError, match=r"bad\.jsonl:551: malformed JSON"):
        shard_corpus(bad, ByteTokenizer(), out, cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    missing_text = write_corpus(tmp_path / "m.jsonl", make_docs(10), [(4, json.dumps({"id": "z", "txt": "x"}))])
    with pytest.raises(DataError, match=r"m\.jsonl:5: missing field 'text'"):
        shard_corpus(missing_text, ByteTokenizer(), out, cfg)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_tokenizer_output_out_of_range_names_the_line(tmp_path):
    class BadTokenizer(ByteTokenizer):
        def encode_batch(self, texts):
            return [[999] if "7" in t else list(t.encode()) for t in texts]

    clean = write_corpus(tmp_path / "c.jsonl", make_docs(10))
    with pytest.raises(DataError, match=r"c\.jsonl:8: tokenizer output: token id 999"):
        shard_corpus(clean, BadTokenizer(), tmp_path / "d", ShardConfig(0.2, 1000, 0))
    assert not (tmp_path / "d" / "shards.json").exists()
    assert list((tmp_path / "d").iterdir()) == []


def test_tokenizer_returning_wrong_count_or_garbage_is_a_data_error(tmp_path):
    class ShortTokenizer(ByteTokenizer):
        def encode_batch(self, texts):
            return [list(t.encode()) for t in texts[:-1]]

    class HugeIdTokenizer(ByteTokenizer):
        def encode_batch(self, texts):
            return [[2**70] for _ in texts]

    clean = write_corpus(tmp_path / "c.jsonl", make_docs(10))
    with pytest.raises(DataError, match="returned 9 encodings for a batch of 10"):
        shard_corpus(clean, ShortTokenizer(), tmp_path / "d", ShardConfig(0.2, 1000, 0))
    with pytest.raises(DataError, match=r"c\.jsonl:\d+: tokenizer output: token ids must be integers"):
        shard_corpus(clean, HugeIdTokenizer(), tmp_path / "d", ShardConfig(0.2, 1000, 0))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_corpus_is_a_clear_error(tmp_path, content):
    clean = tmp_path / "clean.jsonl"
    clean.write_text(content)
    with pytest.raises(DataError, match=r"clean\.jsonl: the corpus is empty"):
        shard_corpus(clean, ByteTokenizer(), tmp_path / "d", ShardConfig())
    assert not (tmp_path / "d" / "shards.json").exists()


def test_single_document_and_missing_file_are_clear_errors(tmp_path):
    one = write_corpus(tmp_path / "one.jsonl", make_docs(1))
    with pytest.raises(DataError, match="1 document; sharding needs at least 2"):
        shard_corpus(one, ByteTokenizer(), tmp_path / "d", ShardConfig())
    with pytest.raises(DataError, match=r"absent\.jsonl: cannot read file"):
        shard_corpus(tmp_path / "absent.jsonl", ByteTokenizer(), tmp_path / "d", ShardConfig())


def test_tiny_corpus_still_gets_a_val_split(tmp_path):
    cfg = ShardConfig()  # val_fraction 0.05
    train_ids = [f"t{i}" for i in range(200) if split_score(cfg.seed, f"t{i}") >= cfg.val_fraction][:3]
    docs = [(i, f"text of {i}") for i in train_ids]
    summary = shard_corpus(write_corpus(tmp_path / "c.jsonl", docs), ByteTokenizer(), tmp_path / "d", cfg)
    assert summary["val"]["docs"] == 1 and summary["train"]["docs"] == 2
    # The document moved is the one whose score is nearest to val_fraction.
    moved = min(train_ids, key=lambda i: split_score(cfg.seed, i))
    assert decode_docs(stream_of(tmp_path / "d", "val")) == [f"text of {moved}"]


def test_tiny_corpus_all_in_val_keeps_a_train_split(tmp_path):
    cfg = ShardConfig(val_fraction=0.3, seed=5)
    val_ids = [f"v{i}" for i in range(200) if split_score(cfg.seed, f"v{i}") < cfg.val_fraction][:3]
    docs = [(i, f"text of {i}") for i in val_ids]
    summary = shard_corpus(write_corpus(tmp_path / "c.jsonl", docs), ByteTokenizer(), tmp_path / "d", cfg)
    assert summary["val"]["docs"] == 2 and summary["train"]["docs"] == 1
    moved = max(val_ids, key=lambda i: split_score(cfg.seed, i))
    assert decode_docs(stream_of(tmp_path / "d", "train")) == [f"text of {moved}"]


def test_bad_config_and_tokenizer_are_rejected_before_writing(tmp_path):
    clean = write_corpus(tmp_path / "c.jsonl", make_docs(5))
    with pytest.raises(ConfigError, match="shard.val_fraction"):
        shard_corpus(clean, ByteTokenizer(), tmp_path / "d", ShardConfig(val_fraction=0.0))
    with pytest.raises(ConfigError, match="shard.shard_tokens"):
        shard_corpus(clean, ByteTokenizer(), tmp_path / "d", ShardConfig(shard_tokens=0))

    class BadBos(ByteTokenizer):
        bos_id = 300

    with pytest.raises(DataError, match="bos_id 300"):
        shard_corpus(clean, BadBos(), tmp_path / "d", ShardConfig())
    assert not (tmp_path / "d").exists()


def test_corpus_is_encoded_in_batches(tmp_path):
    tok = ByteTokenizer()
    n = 2 * shard_mod.BATCH_DOCS + 5
    shard_corpus(write_corpus(tmp_path / "c.jsonl", make_docs(n)), tok, tmp_path / "d", ShardConfig(0.05, 5000, 0))
    assert tok.calls == 3  # streamed: never the whole corpus in one call
