"""Tokenizers: lossless round trips, special tokens, persistence, tiktoken export, reports, errors."""

import json
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chatforge.config import TokenizerConfig
from chatforge.errors import ChatforgeError, ConfigError, DataError
from chatforge.tokenizer import (
    SPECIAL_TOKENS,
    BPETokenizer,
    ByteTokenizer,
    CharTokenizer,
    Tokenizer,
    compression_report,
    load_tokenizer,
    train_tokenizer,
)
from chatforge.tokenizer.base import META_FILE
from chatforge.tokenizer.bpe import HF_FILE

KINDS = ("bpe", "byte", "char")

_VOCAB_TEXT = (
    "the a customer order refund shipping account password reset help support thank you please "
    "can't won't it's we're they've I'll item delivery tracking number invoice address email "
    "café naïve Straße 東京 привет 😀 print(x) return {} == -> # 42 2024 3.14 $19.99"
)
_WORDS = _VOCAB_TEXT.split()


def make_corpus(n_docs: int, seed: int = 0) -> list[str]:
    """English-like support text with some numbers, code and non-Latin script."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        parts = []
        for _ in range(rng.randint(20, 60)):
            parts.append(rng.choice(_WORDS))
            parts.append(rng.choice((" ", " ", " ", ", ", ". ", "\n", "\n\n")))
        docs.append("".join(parts))
    return docs


CORPUS = make_corpus(600)
# Text the property tests draw from besides arbitrary Unicode: corpus pieces exercise
# the merges, odd whitespace and case-folding characters exercise the split regex.
_TRICKY = list(" \t\n\r\x0b\x0c\x85\xa0\u2028\u3000'sSkKſK0123456789.,!é東😀") + ["<|assistant|>", "<|end|>"]
texts = st.text() | st.lists(st.sampled_from(_WORDS + _TRICKY), max_size=30).map("".join)


@pytest.fixture(scope="module")
def toks() -> dict[str, Tokenizer]:
    t0 = time.perf_counter()
    bpe = train_tokenizer(CORPUS, TokenizerConfig(kind="bpe", vocab_size=500, min_frequency=2))
    assert time.perf_counter() - t0 < 2.0  # keep the suite fast
    char = train_tokenizer(CORPUS, TokenizerConfig(kind="char", vocab_size=300))
    byte = train_tokenizer(CORPUS, TokenizerConfig(kind="byte"))
    return {"bpe": bpe, "byte": byte, "char": char}


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", KINDS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=texts)
def test_decode_encode_round_trip(toks, kind, s):
    tok = toks[kind]
    ids = tok.encode(s)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert not any(tok.is_special(i) for i in ids)
    assert tok.decode(ids) == s


def test_types_and_kinds(toks):
    assert isinstance(toks["bpe"], BPETokenizer) and toks["bpe"].kind == "bpe"
    assert isinstance(toks["byte"], ByteTokenizer) and toks["byte"].kind == "byte"
    assert isinstance(toks["char"], CharTokenizer) and toks["char"].kind == "char"


def test_bpe_compresses_and_batch_matches_single(toks):
    bpe = toks["bpe"]
    docs = CORPUS[:50]
    assert bpe.encode_batch(docs) == [bpe.encode(d) for d in docs]
    assert bpe.encode_batch([]) == []
    # The learned merges must actually be used: a frequent word is one token.
    assert len(bpe.encode(" customer")) == 1


def test_bpe_training_is_deterministic(toks):
    again = train_tokenizer(CORPUS, TokenizerConfig(kind="bpe", vocab_size=500, min_frequency=2))
    assert [again.token_bytes(i) for i in range(again.vocab_size)] == [
        toks["bpe"].token_bytes(i) for i in range(toks["bpe"].vocab_size)
    ]


def test_split_keeps_digits_in_groups_of_three(toks):
    # The cl100k rule: digits are split in runs of at most three before any merge, so
    # no token crosses a 3-digit boundary (though "2024" is frequent in the corpus).
    bpe = toks["bpe"]
    ends, pos = set(), 0
    for i in bpe.encode("20242024"):
        pos += len(bpe.token_bytes(i))
        ends.add(pos)
    assert {3, 6, 8} <= ends
    assert bpe.to_tiktoken().encode_ordinary("20242024") == bpe.encode_hf("20242024")


@pytest.mark.parametrize("max_digits", [1, 2])
def test_max_digits_narrows_the_digit_runs(max_digits, tmp_path):
    # nanochat splits digits in runs of two, LLaMA in ones: no token crosses such a boundary,
    # tiktoken agrees, and the pattern survives a save and load.
    bpe = train_tokenizer(CORPUS, TokenizerConfig(kind="bpe", vocab_size=500, max_digits=max_digits))
    ends, pos = set(), 0
    for i in bpe.encode("20242024"):
        pos += len(bpe.token_bytes(i))
        ends.add(pos)
    assert set(range(max_digits, 8, max_digits)) <= ends
    assert bpe.to_tiktoken().encode_ordinary("SW-5955139 $171.99") == bpe.encode_hf("SW-5955139 $171.99")
    bpe.save(tmp_path)
    back = load_tokenizer(tmp_path)
    assert back.pattern == bpe.pattern != BPETokenizer(train_tokenizer(CORPUS[:50], TokenizerConfig(
        vocab_size=300)).hf_tokenizer).pattern
    assert back.encode("5955139") == bpe.encode("5955139")
    meta = json.loads((tmp_path / META_FILE).read_text())
    (tmp_path / META_FILE).write_text(json.dumps({**meta, "pattern": meta["pattern"].replace(
        f"{{1,{max_digits}}}", "{1,3}")}))
    with pytest.raises(DataError, match="pattern"):
        load_tokenizer(tmp_path)


def test_max_digits_must_be_one_two_or_three():
    with pytest.raises(ConfigError, match="tokenizer.max_digits"):
        train_tokenizer(CORPUS[:10], TokenizerConfig(kind="bpe", vocab_size=300, max_digits=4))


# --------------------------------------------------------------------------- special tokens


@pytest.mark.parametrize("kind", KINDS)
def test_special_looking_text_is_not_special(toks, kind):
    tok = toks[kind]
    text = "<|user|>hi<|end|><|assistant|> <|bos|><|pad|>"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "<|end|>"]) == [ids, tok.encode("<|end|>")]


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_at_documented_positions(toks, kind):
    tok = toks[kind]
    specials = tok.special_tokens
    n = len(SPECIAL_TOKENS)
    # Ordinary tokens first, then the specials in SPECIAL_TOKENS order, ending the vocabulary.
    assert list(specials) == list(SPECIAL_TOKENS)
    assert list(specials.values()) == list(range(tok.vocab_size - n, tok.vocab_size))
    assert len(set(specials.values())) == n
    assert (tok.bos_id, tok.pad_id, tok.end_id) == (specials["<|bos|>"], specials["<|pad|>"], specials["<|end|>"])
    assert tok.special_id("<|assistant|>") == specials["<|assistant|>"]
    assert tok.is_special(tok.vocab_size - 1) and not tok.is_special(tok.vocab_size - n - 1)
    assert tok.decode([tok.bos_id]) == "<|bos|>"
    with pytest.raises(ChatforgeError, match="unknown special token"):
        tok.special_id("<|nope|>")


def test_byte_and_bpe_layouts(toks):
    assert toks["byte"].bos_id == 256 and toks["byte"].vocab_size == 256 + len(SPECIAL_TOKENS)
    assert toks["byte"].encode("é") == [0xC3, 0xA9]
    bpe = toks["bpe"]
    # tokenizer.json gives the specials the same ids chatforge does, so HF tools agree.
    for name, i in bpe.special_tokens.items():
        assert bpe.hf_tokenizer.token_to_id(name) == i
    # Every single byte is an ordinary token.
    assert {bpe.token_bytes(i) for i in range(bpe.bos_id) if len(bpe.token_bytes(i)) == 1} == {
        bytes([b]) for b in range(256)
    }


# --------------------------------------------------------------------------- persistence


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(toks, kind, tmp_path):
    tok = toks[kind]
    tok.save(tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert type(loaded) is type(tok)
    assert loaded.vocab_size == tok.vocab_size
    assert loaded.special_tokens == tok.special_tokens
    probe = [*CORPUS[:20], "<|assistant|> 😀 ſK 1234567", ""]
    assert [loaded.encode(t) for t in probe] == [tok.encode(t) for t in probe]
    assert loaded.encode_batch(probe) == tok.encode_batch(probe)
    meta = json.loads((tmp_path / "tok" / META_FILE).read_text())
    assert meta["kind"] == kind and meta["vocab_size"] == tok.vocab_size


def test_bpe_save_writes_hf_file_and_train_info(toks, tmp_path):
    toks["bpe"].save(tmp_path)
    assert (tmp_path / HF_FILE).is_file()
    loaded = load_tokenizer(tmp_path)
    assert loaded.train_info["docs"] == len(CORPUS)
    assert loaded.train_info["bytes"] == sum(len(d.encode()) for d in CORPUS)
    assert loaded.train_info["capped"] is False


# --------------------------------------------------------------------------- tiktoken export


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=texts)
def test_tiktoken_export_matches(toks, s):
    """tiktoken with the exported ranks gives exactly the HF tokenizer's ids (encode's fast path)."""
    bpe = toks["bpe"]
    enc = _tiktoken(bpe)
    assert enc.encode_ordinary(s) == bpe.encode_hf(s) == bpe.encode(s)


_TIKTOKEN_CACHE: dict[int, object] = {}


def _tiktoken(bpe: BPETokenizer):
    pytest.importorskip("tiktoken")
    if id(bpe) not in _TIKTOKEN_CACHE:
        _TIKTOKEN_CACHE[id(bpe)] = bpe.to_tiktoken()
    return _TIKTOKEN_CACHE[id(bpe)]


def test_tiktoken_export_on_corpus_and_specials(toks):
    bpe = toks["bpe"]
    enc = _tiktoken(bpe)
    assert enc.n_vocab == bpe.vocab_size
    docs = make_corpus(100, seed=7)  # unseen documents in the training style
    hf = [e.ids for e in bpe.hf_tokenizer.encode_batch(docs, add_special_tokens=False)]
    assert enc.encode_ordinary_batch(docs) == hf == bpe.encode_batch(docs)
    assert enc.encode("<|end|>", allowed_special="all") == [bpe.end_id]
    assert enc.decode(bpe.encode(docs[0])) == docs[0]


def test_encode_without_tiktoken_uses_hf(toks, monkeypatch):
    bpe = toks["bpe"]
    docs = make_corpus(20, seed=3)
    expected = bpe.encode_batch(docs)
    monkeypatch.setattr(bpe, "_tiktoken", False)  # as when tiktoken is not installed
    assert bpe.encode_batch(docs) == expected and bpe.encode(docs[0]) == expected[0]


# --------------------------------------------------------------------------- training options


def test_vocab_size_respected():
    rich = make_corpus(300, seed=3) + [f"word{i} token{i * 7} item-{i % 97}" for i in range(2000)]
    for vocab_size in (300, 400):
        tok = train_tokenizer(rich, TokenizerConfig(kind="bpe", vocab_size=vocab_size))
        assert tok.vocab_size == vocab_size  # a rich corpus fills the vocabulary exactly
    tiny = train_tokenizer(["ab ab ab"], TokenizerConfig(kind="bpe", vocab_size=4096))
    assert 256 + len(SPECIAL_TOKENS) < tiny.vocab_size < 4096  # a tiny corpus runs out of merges
    char = train_tokenizer(CORPUS, TokenizerConfig(kind="char", vocab_size=256 + len(SPECIAL_TOKENS) + 5))
    assert char.vocab_size == 256 + len(SPECIAL_TOKENS) + 5
    assert char.chars[0] == " "  # most frequent character first


def test_min_frequency_limits_merges():
    docs = ["xq " * 3 + "zw"]  # "xq" occurs 3 times, "zw" once
    low = train_tokenizer(docs, TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=1))
    high = train_tokenizer(docs, TokenizerConfig(kind="bpe", vocab_size=400, min_frequency=5))
    assert len(low.encode("zw")) == 1
    assert high.vocab_size == 256 + len(SPECIAL_TOKENS)  # no pair is frequent enough
    assert len(high.encode("xq")) == 2


def test_max_train_mb_caps_training_text():
    head = ["alpha beta gamma. " * 20] * 10  # 3600 bytes
    tail = ["zebraquokka " * 50] * 10  # only after the cap
    capped = train_tokenizer(iter(head + tail), TokenizerConfig(kind="bpe", vocab_size=400, max_train_mb=0.003))
    full = train_tokenizer(head + tail, TokenizerConfig(kind="bpe", vocab_size=400))
    assert capped.train_info["capped"] is True
    assert capped.train_info["bytes"] == 3000
    assert capped.train_info["docs"] < len(head)
    assert full.train_info["capped"] is False and full.train_info["bytes"] == sum(len(d) for d in head + tail)
    assert len(full.encode(" zebraquokka")) == 1
    assert len(capped.encode(" zebraquokka")) > 3  # never seen: spelled out


def test_max_train_mb_cut_never_splits_a_character():
    tok = train_tokenizer(["é" * 1000], TokenizerConfig(kind="bpe", vocab_size=300, max_train_mb=0.000101))
    assert tok.train_info["bytes"] == 100  # 101 bytes allowed; the half of the 51st "é" is dropped


# --------------------------------------------------------------------------- compression report


def test_compression_report_consistent(toks):
    docs = make_corpus(40, seed=11)
    n_bytes = sum(len(d.encode()) for d in docs)
    for kind, tok in toks.items():
        r = compression_report(tok, iter(docs))
        n_tokens = sum(len(tok.encode(d)) for d in docs)
        assert (r["n_docs"], r["bytes"], r["chars"], r["tokens"]) == (40, n_bytes, sum(map(len, docs)), n_tokens)
        assert r["bytes_per_token"] == pytest.approx(n_bytes / n_tokens, rel=1e-3)
        assert r["byte_tokens"] == n_bytes and r["byte_bytes_per_token"] == 1.0
        assert r["ratio"] == pytest.approx(r["byte_tokens"] / r["tokens"], rel=1e-3)
        assert r["kind"] == kind and r["vocab_size"] == tok.vocab_size
        json.dumps(r)  # written to compression.json
    assert compression_report(toks["byte"], docs)["ratio"] == 1.0
    assert compression_report(toks["bpe"], docs)["bytes_per_token"] > 2.0
    assert compression_report(toks["bpe"], [])["tokens"] == 0


# --------------------------------------------------------------------------- errors


def test_load_missing_directory(tmp_path):
    with pytest.raises(ChatforgeError, match="does not exist") as e:
        load_tokenizer(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)
    with pytest.raises(DataError, match=META_FILE):
        load_tokenizer(tmp_path)  # exists, but holds no tokenizer
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ChatforgeError, match="not a tokenizer directory"):
        load_tokenizer(tmp_path / "f.txt")


def test_load_corrupt_files(toks, tmp_path):
    toks["bpe"].save(tmp_path)
    hf_path = tmp_path / HF_FILE
    good = hf_path.read_text()
    hf_path.write_text(good[: len(good) // 2])
    with pytest.raises(DataError, match="corrupt tokenizer file") as e:
        load_tokenizer(tmp_path)
    assert str(hf_path) in str(e.value)
    hf_path.unlink()
    with pytest.raises(DataError, match="missing"):
        load_tokenizer(tmp_path)
    hf_path.write_text(good)
    (tmp_path / META_FILE).write_text("{not json")
    with pytest.raises(DataError, match="corrupt tokenizer metadata"):
        load_tokenizer(tmp_path)


def test_load_rejects_inconsistent_or_foreign_files(toks, tmp_path):
    toks["bpe"].save(tmp_path)
    meta_path = tmp_path / META_FILE
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "kind": "wordpiece"}))
    with pytest.raises(DataError, match="unknown tokenizer kind 'wordpiece'"):
        load_tokenizer(tmp_path)
    meta_path.write_text(json.dumps({**meta, "vocab_size": meta["vocab_size"] + 1}))
    with pytest.raises(DataError, match="metadata disagrees"):
        load_tokenizer(tmp_path)
    meta_path.write_text(json.dumps(meta))
    spec = json.loads((tmp_path / HF_FILE).read_text())
    spec["pre_tokenizer"] = None  # someone else's tokenizer.json
    (tmp_path / HF_FILE).write_text(json.dumps(spec))
    with pytest.raises(DataError, match="pre_tokenizer"):
        load_tokenizer(tmp_path)


def test_train_errors():
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        train_tokenizer(CORPUS, TokenizerConfig(kind="wordpiece"))
    for kind in ("bpe", "char"):
        for empty in ([], ["", ""]):
            with pytest.raises(DataError, match="no text to train the tokenizer on"):
                train_tokenizer(iter(empty), TokenizerConfig(kind=kind, vocab_size=400))
    assert train_tokenizer([], TokenizerConfig(kind="byte")).vocab_size == 256 + len(SPECIAL_TOKENS)
    with pytest.raises(ConfigError, match="too small for bpe"):
        train_tokenizer(CORPUS, TokenizerConfig(kind="bpe", vocab_size=260))
    with pytest.raises(DataError, match="training text 1 is a int"):
        train_tokenizer(["ok", 5], TokenizerConfig(kind="bpe", vocab_size=400))


@pytest.mark.parametrize("kind", KINDS)
def test_decode_and_encode_errors(toks, kind):
    tok = toks[kind]
    for bad in (tok.vocab_size, -1, 10**9):
        with pytest.raises(ChatforgeError, match=f"cannot decode token id {bad}"):
            tok.decode([1, bad])
    with pytest.raises(ChatforgeError, match="out of range"):
        tok.token_bytes(tok.vocab_size)
    with pytest.raises(DataError, match="lone surrogate U\\+D800 at character 1"):
        tok.encode("a\ud800b")
    with pytest.raises(DataError, match="expects a str"):
        tok.encode(b"bytes")  # type: ignore[arg-type]


def test_bpe_batch_error_names_the_text(toks):
    with pytest.raises(DataError, match="text 1 of the batch: .*lone surrogate"):
        toks["bpe"].encode_batch(["fine", "bad\udc00"])
