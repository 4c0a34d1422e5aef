"""Collect: every source format, directories and globs, streaming, and located errors."""

import builtins
import csv
import io
import json
import os
import random
import subprocess
import sys
import textwrap
import types
import urllib.error
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chatforge.config import CleanConfig, CollectConfig
from chatforge.data.clean import clean
from chatforge.data.collect import collect, iter_documents
from chatforge.data.json_stream import iter_json_values
from chatforge.data.split import split_text
from chatforge.errors import ChatforgeError, DataError

CFG = CollectConfig()


def docs_of(source, cfg=CFG):
    return list(iter_documents(str(source), cfg))


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- formats


def test_txt_and_md_are_one_document_per_file(tmp_path):
    (tmp_path / "a.txt").write_text("Plain text.\nSecond line. Ünïcödé", encoding="utf-8")
    (tmp_path / "b.md").write_text("# Title\n\nSome *markdown*.", encoding="utf-8")
    [txt] = docs_of(tmp_path / "a.txt")
    [md] = docs_of(tmp_path / "b.md")
    assert txt == {"id": str(tmp_path / "a.txt"), "text": "Plain text.\nSecond line. Ünïcödé",
                   "source": str(tmp_path / "a.txt")}
    assert md["text"] == "# Title\n\nSome *markdown*." and "format" not in md


# --------------------------------------------------------------------------- long plain text: several documents

WORDS = ("the", "shop", "sends", "a", "parcel", "quickly", "river", "lantern", "harvest", "morning", "quiet",
         "stone", "letter", "garden", "window", "travelled", "across", "northern", "valley", "beneath")
SHAKESPEARE = Path("/work/shared/data/tinyshakespeare.txt")


def make_book(n_words: int, seed: int = 0) -> str:
    """Chapters (Markdown headings) of paragraphs of random words; no two paragraphs alike."""
    rng = random.Random(seed)
    chapters, words, k = [], 0, 0
    while words < n_words:
        paragraphs = [f"# Chapter {len(chapters) + 1}"]
        for _ in range(rng.randint(5, 15)):
            k += 1
            n = rng.randint(30, 120)
            paragraphs.append(f"Paragraph {k}. " + " ".join(rng.choice(WORDS) for _ in range(n)) + ".")
            words += n + 2
        chapters.append("\n\n".join(paragraphs))
    return "\n\n".join(chapters) + "\n"


def test_a_book_becomes_documents_that_pass_clean(tmp_path):
    """A book longer than clean.max_words is kept, as documents FILE#1.. whose text is the book's."""
    clean_cfg = CleanConfig(workers=1)
    text = make_book(clean_cfg.max_words + 20_000)
    book = tmp_path / "book.md"
    book.write_text(text, encoding="utf-8")
    docs = docs_of(book)
    assert len(docs) > 1 and [d["id"] for d in docs] == [f"{book}#{k}" for k in range(1, len(docs) + 1)]
    assert all(d["source"] == str(book) and len(d["text"]) <= CFG.max_doc_chars for d in docs)
    assert "\n\n".join(d["text"] for d in docs) == text.rstrip("\n")  # cut at blank lines only
    assert all(d["text"].startswith("# Chapter") for d in docs)  # and, with room to spare, at headings

    stats = collect([str(book)], tmp_path / "raw.jsonl", CFG)
    report = clean(tmp_path / "raw.jsonl", tmp_path / "clean.jsonl", tmp_path / "report.json", clean_cfg)
    assert stats["docs"] == report["output"]["docs"] == len(docs) and report["dropped"]["docs"] == 0
    # As one document (the old behaviour, still there with max_doc_chars=0) the length rule drops all of it.
    one = CollectConfig(max_doc_chars=0)
    assert [d["id"] for d in docs_of(book, one)] == [str(book)]
    collect([str(book)], tmp_path / "raw1.jsonl", one)
    with pytest.raises(DataError, match=r"every one of 1 documents was dropped \(too_long: 1\)"):
        clean(tmp_path / "raw1.jsonl", tmp_path / "clean1.jsonl", tmp_path / "report1.json", clean_cfg)


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"{SHAKESPEARE} is not on this machine")
def test_tinyshakespeare_collects_into_documents_that_all_pass_clean(tmp_path):
    raw, out = tmp_path / "raw.jsonl", tmp_path / "clean.jsonl"
    stats = collect([str(SHAKESPEARE)], raw, CFG)
    report = clean(raw, out, tmp_path / "report.json", CleanConfig(workers=1))
    assert stats["docs"] > 1 and report["output"]["docs"] == stats["docs"], report["rules"]
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert "".join("".join(json.loads(line)["text"].split()) for line in raw.open(encoding="utf-8")) == \
        "".join(text.split())


def split(text: str, max_chars: int) -> list[str]:
    return list(split_text(io.StringIO(text, newline=""), max_chars))


def assert_slices(text: str, docs: list[str], max_chars: int) -> None:
    """Each document is a non-blank slice of ``text``, in order, at most ``max_chars`` long, and only
    whitespace lies between them (and before the first and after the last)."""
    pos = 0
    for d in docs:
        assert d.strip() and len(d) <= max_chars, (d, max_chars)
        i = text.find(d, pos)
        assert i >= 0 and not text[pos:i].strip(), (text, docs)
        pos = i + len(d)
    assert not text[pos:].strip()


def test_split_text_cuts_at_blank_lines_then_lines_then_spaces():
    assert split("one two\n\nthree four\n\nfive", 20) == ["one two\n\nthree four", "five"]
    assert split("line one\nline two\nline three", 18) == ["line one\nline two", "line three"]
    assert split("alpha beta gamma delta", 11) == ["alpha beta", "gamma delta"]
    assert split("abcdefghij", 4) == ["abcd", "efgh", "ij"]  # no whitespace at all: mid-word
    assert split("a\r\nb\r\n\r\nc", 4) == ["a\r\nb", "c"]  # Windows line ends stay inside
    assert split("    indented line", 100) == ["    indented line"]
    assert split(" \n\t\n\n", 5) == [] and split("", 5) == []
    # A heading starts a new document once the current one is at least half full.
    assert split("# A\n\ntext text\n\n# B\n\nmore", 28) == ["# A\n\ntext text", "# B\n\nmore"]
    assert split("# A\n\nab\n\n# B\n\ncd", 40) == ["# A\n\nab\n\n# B\n\ncd"]
    with pytest.raises(ValueError):
        split("x", 0)


def test_split_text_keeps_every_character_but_the_separators():
    rng = random.Random(0)
    pieces = ["a", "bb", "word", " ", "  ", "\t", "\n", "\n\n", "\r\n", "# ", "#", "é", "xyzxyzxyz"]
    for _ in range(3000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))
        max_chars = rng.randint(1, 30)
        assert_slices(text, split(text, max_chars), max_chars)


def test_short_or_blank_text_file_is_one_document(tmp_path):
    (tmp_path / "blank.txt").write_text("\n\n", encoding="utf-8")
    assert docs_of(tmp_path / "blank.txt") == [{"id": str(tmp_path / "blank.txt"), "text": "",
                                                "source": str(tmp_path / "blank.txt")}]
    (tmp_path / "short.md").write_text("\n# Title\n\nBody.\n", encoding="utf-8")
    assert [d["text"] for d in docs_of(tmp_path / "short.md")] == ["# Title\n\nBody."]


def test_html_documents_are_marked_for_markup_stripping(tmp_path):
    for name in ("page.html", "old.htm"):
        (tmp_path / name).write_text("<html><body><p>Hello</p></body></html>", encoding="utf-8")
        [doc] = docs_of(tmp_path / name)
        assert doc["format"] == "html" and doc["text"].startswith("<html>")


def test_html_in_a_declared_legacy_charset(tmp_path):
    page = '<html><head><meta charset="windows-1252"></head><body><p>caf\xe9</p></body></html>'
    (tmp_path / "latin.html").write_bytes(page.encode("cp1252"))
    [doc] = docs_of(tmp_path / "latin.html")
    assert "café" in doc["text"]


def test_jsonl_text_and_id_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "one", "id": 7}, {"text": "two"}])
    (tmp_path / "d.jsonl").write_text(path.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines
    docs = docs_of(path)
    assert [d["text"] for d in docs] == ["one", "two"]
    assert docs[0]["id"] == "7" and docs[1]["id"] == f"{path}:2"
    assert all(d["source"] == str(path) for d in docs)

    custom = write_jsonl(tmp_path / "c.jsonl", [{"body": "hello", "uid": "u1"}])
    [doc] = docs_of(custom, CollectConfig(text_field="body", id_field="uid"))
    assert doc == {"id": "u1", "text": "hello", "source": str(custom)}


def test_json_array_and_single_object(tmp_path):
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"text": "a", "id": "x"}, {"text": "b"}], indent=2), encoding="utf-8")
    docs = docs_of(arr)
    assert [(d["id"], d["text"]) for d in docs] == [("x", "a"), (f"{arr}[1]", "b")]
    one = tmp_path / "one.json"
    one.write_text('{"content": "solo"}', encoding="utf-8")
    [doc] = docs_of(one, CollectConfig(text_field="content"))
    assert doc["text"] == "solo"
    empty = tmp_path / "empty.json"
    empty.write_text("[ ]", encoding="utf-8")
    assert docs_of(empty) == []


def test_json_array_is_streamed_across_chunk_boundaries():
    """Values cut anywhere by the read chunk (numbers, escapes, multi-byte UTF-8) decode exactly."""
    values = [{"text": "é😀\\\"x" * (i % 5), "n": 12345678901 * i, "f": 1.5e-3, "nested": {"a": [1, None, True]}}
              for i in range(40)]
    data = json.dumps(values, ensure_ascii=False, indent=1).encode("utf-8")
    for chunk_size in (1, 3, 7, 64):
        got = [v for _, _, v in iter_json_values(io.BytesIO(data), "mem.json", chunk_size=chunk_size)]
        assert got == values
    # Line numbers point at each element's first line.
    lines = [line for _, line, _ in iter_json_values(io.BytesIO(b'[\n{"a": 1},\n\n{"a": 2}]'), "m", chunk_size=4)]
    assert lines == [2, 4]


def test_parquet_in_record_batches(tmp_path):
    path = tmp_path / "d.parquet"
    texts = [f"document number {i}" for i in range(1000)]
    table = pa.table({"text": texts, "id": [f"p{i}" for i in range(1000)], "extra": list(range(1000))})
    pq.write_table(table, path, row_group_size=300)
    docs = docs_of(path)
    assert [d["text"] for d in docs] == texts
    assert docs[0]["id"] == "p0" and docs[-1]["id"] == "p999"
    no_id = tmp_path / "noid.parquet"
    pq.write_table(pa.table({"body": ["x", "y"]}), no_id)
    assert [d["id"] for d in docs_of(no_id, CollectConfig(text_field="body"))] == [f"{no_id}:1", f"{no_id}:2"]


def test_csv_streams_rows_with_quoted_newlines(tmp_path):
    path = tmp_path / "d.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "label"])
        w.writerow(["r1", "first, with comma", "a"])
        w.writerow(["", "multi\nline \"quoted\"", "b"])
        w.writerow(["r3", "x" * 200_000, "c"])  # longer than csv's default field limit
    docs = docs_of(path)
    assert [d["text"] for d in docs] == ["first, with comma", 'multi\nline "quoted"', "x" * 200_000]
    assert docs[0]["id"] == "r1" and docs[1]["id"] == f"{path}:3"  # empty id -> file:line


def test_directory_is_recursive_sorted_and_skips_hidden_and_unsupported(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "z.txt").write_text("z", encoding="utf-8")
    (root / "a.md").write_text("a", encoding="utf-8")
    (root / "b" / "deep" / "c.jsonl").write_text('{"text": "c"}\n', encoding="utf-8")
    (root / "b" / "notes.docx").write_bytes(b"binary")
    (root / ".git" / "x.txt").write_text("hidden", encoding="utf-8")
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    skipped: list[Path] = []
    docs = list(iter_documents(str(root), CFG, skipped))
    assert [d["text"] for d in docs] == ["a", "c", "z"]
    assert skipped == [root / "b" / "notes.docx"]


def test_glob_including_recursive_pattern(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "one.txt").write_text("1", encoding="utf-8")
    (tmp_path / "two.txt").write_text("2", encoding="utf-8")
    (tmp_path / "x" / "three.txt").write_text("3", encoding="utf-8")
    (tmp_path / "skip.md").write_text("no", encoding="utf-8")
    assert [d["text"] for d in docs_of(f"{tmp_path}/*.txt")] == ["1", "2"]
    assert sorted(d["text"] for d in docs_of(f"{tmp_path}/**/*.txt")) == ["1", "2", "3"]


# --------------------------------------------------------------------------- collect()


def test_collect_writes_raw_jsonl_and_stats(tmp_path):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    rows = write_jsonl(tmp_path / "r.jsonl", [{"text": "beta"}, {"text": "gamma\u2028δ"}])
    out = tmp_path / "run" / "raw.jsonl"
    stats = collect([str(tmp_path / "a.txt"), str(rows)], out, CFG)
    # split on "\n" only: U+2028 inside a text is not a line break in JSONL
    got = [json.loads(line) for line in out.read_text(encoding="utf-8").split("\n")[:-1]]
    assert [d["text"] for d in got] == ["alpha", "beta", "gamma\u2028δ"]
    assert stats["docs"] == 3 and stats["chars"] == 5 + 4 + 7
    assert stats["sources"] == {str(tmp_path / "a.txt"): 1, str(rows): 2}
    assert stats["mb_per_s"] > 0


def test_collect_honours_max_docs(tmp_path):
    rows = write_jsonl(tmp_path / "r.jsonl", [{"text": f"t{i}"} for i in range(10)])
    out = tmp_path / "raw.jsonl"
    stats = collect([str(rows), str(rows)], out, CollectConfig(max_docs=4))
    assert stats["docs"] == 4 and len(out.read_text().splitlines()) == 4


def test_collect_keeps_lone_surrogates_as_escapes(tmp_path):
    path = tmp_path / "s.jsonl"
    path.write_text('{"text": "bad \\ud800 surrogate"}\n', encoding="utf-8")
    out = tmp_path / "raw.jsonl"
    collect([str(path)], out, CFG)
    assert json.loads(out.read_text(encoding="utf-8"))["text"] == "bad \ud800 surrogate"


def test_failed_collect_leaves_earlier_output_intact(tmp_path):
    out = tmp_path / "raw.jsonl"
    out.write_text("earlier\n", encoding="utf-8")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: malformed JSON"):
        collect([str(bad)], out, CFG)
    assert out.read_text(encoding="utf-8") == "earlier\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "raw.jsonl"]  # no temp file left


def test_collect_memory_stays_bounded_on_a_50mb_corpus(tmp_path):
    """Collect ~50 MB of JSONL and ~10 MB of JSON array in a fresh process; peak RSS must barely move."""
    big = tmp_path / "big.jsonl"
    line_text = ("word " * 1000)[:5000]
    with big.open("w", encoding="utf-8") as f:
        for i in range(10_000):
            f.write(json.dumps({"id": i, "text": line_text}) + "\n")
    arr = tmp_path / "big.json"
    with arr.open("w", encoding="utf-8") as f:
        f.write("[")
        f.write(",\n".join(json.dumps({"text": line_text}) for _ in range(2000)))
        f.write("]")
    assert big.stat().st_size > 50e6
    # Peak RSS of the child itself: VmHWM (ru_maxrss would include the parent's peak on Linux).
    script = textwrap.dedent("""
        import re, resource, sys
        from pathlib import Path
        from chatforge.config import CollectConfig
        from chatforge.data.collect import collect

        def peak_mb():
            try:
                with open("/proc/self/status") as f:
                    return int(re.search(r"VmHWM:\\s+(\\d+) kB", f.read()).group(1)) / 1024
            except OSError:  # not Linux: ru_maxrss is in bytes on macOS
                return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20

        before = peak_mb()
        stats = collect(sys.argv[1:3], Path(sys.argv[3]), CollectConfig())
        print(stats["docs"], peak_mb() - before)
    """)
    res = subprocess.run([sys.executable, "-c", script, str(big), str(arr), str(tmp_path / "raw.jsonl")],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent)
    docs, growth_mb = res.stdout.split()
    assert int(docs) == 12_000
    assert float(growth_mb) < 25, f"peak RSS grew by {growth_mb} MB while collecting 60 MB"


# --------------------------------------------------------------------------- remote sources (no network)


def test_hf_source_without_datasets_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(ChatforgeError, match=r"hf:org/name: the Hugging Face `datasets` package is not installed"):
        docs_of("hf:org/name")


def test_hf_source_streams_the_configured_split(monkeypatch):
    calls = {}

    def load_dataset(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": "from hub", "id": 1}, {"content": "no text field"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    docs = iter_documents("hf:org/name:cfg", CollectConfig(hf_split="validation"))
    assert next(docs) == {"id": "1", "text": "from hub", "source": "hf:org/name:cfg"}
    assert calls == {"name": "org/name", "config": "cfg", "split": "validation", "streaming": True}
    with pytest.raises(DataError, match=r"row 1: missing text field 'text'; fields present: content"):
        next(docs)


def test_hf_source_offline_error(monkeypatch):
    def load_dataset(*args, **kwargs):
        raise ConnectionError("couldn't reach the Hub")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(ChatforgeError, match=r"hf:x: cannot load split 'train': couldn't reach the Hub .*network"):
        docs_of("hf:x")


def test_url_source_offline_error(monkeypatch):
    def urlopen(url, timeout):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    with pytest.raises(ChatforgeError, match=r"https://example.org/d.jsonl: cannot download: Temporary failure"):
        docs_of("https://example.org/d.jsonl")


def test_url_source_is_parsed_by_content_type(monkeypatch):
    class Response(io.BytesIO):
        headers = types.SimpleNamespace(get_content_type=lambda: "application/x-ndjson")

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Response(b'{"text": "remote"}\n'))
    [doc] = docs_of("https://example.org/export")
    assert doc == {"id": "https://example.org/export:1", "text": "remote", "source": "https://example.org/export"}


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ["locked.txt", "locked.jsonl", "locked.json", "locked.csv", "locked.parquet"])
def test_unreadable_file_any_format(tmp_path, monkeypatch, name):
    """A file the OS refuses to open (simulated: root could read a chmod-0 file), in every format."""
    path = tmp_path / name
    path.write_bytes(b"")
    real_open = builtins.open

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, str | bytes | os.PathLike) and Path(os.fsdecode(file)) == path:
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", guarded_open)
    with pytest.raises(DataError, match=rf"{name}: cannot read file: Permission denied"):
        docs_of(path)


def test_malformed_jsonl_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": "unterminated}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:3: malformed JSON: Invalid control character"):
        docs_of(path)


def test_missing_text_field_names_field_and_fields_present(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"body": "x", "title": "y"}])
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing text field 'text'; fields present: body, title"):
        docs_of(path)
    arr = tmp_path / "d.json"
    arr.write_text('[{"text": "ok"},\n {"body": "x"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:2 \(element 1\): missing text field 'text'; fields present: body"):
        docs_of(arr)
    table = tmp_path / "d.csv"
    table.write_text("title,body\nA,b\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.csv:1: missing text field 'text'; fields present: title, body"):
        docs_of(table)
    pqt = tmp_path / "d.parquet"
    pq.write_table(pa.table({"body": ["x"]}), pqt)
    with pytest.raises(DataError, match=r"d\.parquet: missing text field 'text'; fields present: body"):
        docs_of(pqt)


def test_text_field_not_a_string(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": ["a", "list"]}])
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'text' must be a string, got list"):
        docs_of(path)
    pqt = tmp_path / "n.parquet"
    pq.write_table(pa.table({"text": [1, 2]}), pqt)
    with pytest.raises(DataError, match=r"n\.parquet: field 'text' must be a string column, got type int64"):
        docs_of(pqt)
    nul = tmp_path / "null.parquet"
    pq.write_table(pa.table({"text": ["a", None]}), nul)
    with pytest.raises(DataError, match=r"null\.parquet: row 2: field 'text' is null"):
        docs_of(nul)


def test_invalid_utf8_is_located(tmp_path):
    jl = tmp_path / "d.jsonl"
    jl.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid UTF-8 at byte 13 of the line"):
        docs_of(jl)
    txt = tmp_path / "d.txt"
    txt.write_bytes(b"line one\nbad \xff byte")
    with pytest.raises(DataError, match=r"d\.txt: invalid UTF-8 at byte offset 13 \(line 2\)"):
        docs_of(txt)
    table = tmp_path / "d.csv"
    table.write_bytes(b"text\nok\n\xc3\x28\n")
    with pytest.raises(DataError, match=r"d\.csv:3: invalid UTF-8"):
        docs_of(table)
    arr = tmp_path / "d.json"
    arr.write_bytes(b'[{"text": "ok"}, {"text": "\xff"}]')
    with pytest.raises(DataError, match=r"d\.json: invalid UTF-8 at byte offset 27"):
        docs_of(arr)


def test_malformed_json_array_is_located(tmp_path):
    arr = tmp_path / "d.json"
    arr.write_text('[\n{"text": "a"},\n{"text": "b"}\n{"text": "c"}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.json:4: malformed JSON: expected ',' or ']' after element 1"):
        docs_of(arr)
    cut = tmp_path / "cut.json"
    cut.write_text('[{"text": "a"}, {"text": "b', encoding="utf-8")
    with pytest.raises(DataError, match=r"cut\.json:1: malformed JSON: Unterminated string"):
        docs_of(cut)


def test_empty_corpus_names_the_sources(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    blank = tmp_path / "blank.csv"
    blank.write_text("", encoding="utf-8")
    out = tmp_path / "raw.jsonl"
    with pytest.raises(DataError, match=rf"empty corpus: no documents found in {empty}, {blank}"):
        collect([str(empty), str(blank)], out, CFG)
    assert not out.exists()
    with pytest.raises(DataError, match="no sources given"):
        collect([], out, CFG)


def test_missing_path_and_empty_glob(tmp_path):
    with pytest.raises(DataError, match=r"nope\.jsonl: no such file or directory"):
        docs_of(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=r"\*\.parquet: the glob matched no files"):
        docs_of(f"{tmp_path}/*.parquet")


def test_unknown_extension_names_file_and_supported_formats(tmp_path):
    path = tmp_path / "data.xlsx"
    path.write_bytes(b"PK")
    with pytest.raises(DataError, match=r"data\.xlsx: unsupported file format '\.xlsx'; supported: \.txt, \.md, .*\.csv"):
        docs_of(path)
    only_unsupported = tmp_path / "dir"
    only_unsupported.mkdir()
    (only_unsupported / "x.docx").write_bytes(b"")
    with pytest.raises(DataError, match=r"dir: no files of a supported format \(found: .*x\.docx\)"):
        docs_of(only_unsupported)
