"""Collect: gather documents from files, directories, globs, HF datasets and URLs.

Every source becomes a stream of ``{"id", "text", "source"}`` documents (HTML
documents also carry ``"format": "html"``; the clean stage strips their markup).
``collect`` writes them, one JSON object per line, to ``raw.jsonl``.

Memory stays constant in the corpus size: files are read one at a time, JSONL and
CSV line by line, Parquet one record batch at a time (so one row group's column
chunk at most), ``.json`` arrays element by element (``json_stream``), and
``.txt``/``.md`` files line by line. An ``.html`` page is one document, read whole.

A plain-text file longer than ``max_doc_chars`` (a book) becomes several documents,
``FILE#1``, ``FILE#2``, ..., cut at blank lines (``chatforge.data.split``), so that
each one passes the clean stage's length rule and is de-duplicated and reported on
its own; a shorter file is one document with the file's name as its id. The cut is
made here, where each format decides what a document is (a JSONL line, a CSV row, a
file), and not in clean: clean keeps one raw document in, one result out.

Formats are chosen by file extension. A file named explicitly must have a
supported extension; inside a directory or a glob, hidden files and files with
other extensions are skipped (and listed in the stats), so a ``README`` or a
``.DS_Store`` next to the data does not stop a run.
"""

from __future__ import annotations

import csv
import glob
import itertools
import json
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from chatforge.config import CollectConfig
from chatforge.data.json_stream import iter_json_values
from chatforge.data.split import split_text
from chatforge.errors import ChatforgeError, DataError
from chatforge.io import atomic_write, dumps_line

# Extension -> reader kind.
FORMATS: dict[str, str] = {
    ".txt": "text",
    ".md": "text",
    ".html": "html",
    ".htm": "html",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
SUPPORTED = ", ".join(FORMATS)

# For URLs without a telling extension: Content-Type -> extension.
_CONTENT_TYPES = {
    "text/html": ".html",
    "application/xhtml+xml": ".html",
    "text/plain": ".txt",
    "text/markdown": ".md",
    "application/json": ".json",
    "application/x-ndjson": ".jsonl",
    "application/jsonl": ".jsonl",
    "application/x-jsonlines": ".jsonl",
    "text/csv": ".csv",
    "application/vnd.apache.parquet": ".parquet",
    "application/x-parquet": ".parquet",
}

_PARQUET_BATCH_ROWS = 256  # rows per record batch: small, so a batch of long documents stays small
_URL_TIMEOUT_S = 60


# --------------------------------------------------------------------------- sources -> files


def _is_glob(source: str) -> bool:
    return any(ch in source for ch in "*?[")


def _is_remote(source: str) -> bool:
    return source.startswith(("hf:", "http://", "https://"))


def _hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_source(source: str) -> tuple[list[Path], list[Path]]:
    """The files a local source names, in a deterministic order, and the files skipped.

    A file is returned as is; a directory is searched recursively; a glob (``*``,
    ``?``, ``[``; ``**`` crosses directories) is expanded and any directory it
    matches is searched too. Returns ``(files, skipped)`` where ``skipped`` are
    files found in directories/globs whose extension is not a supported format.
    """
    path = Path(source)
    if _is_glob(source):
        matches = sorted(Path(m) for m in glob.glob(source, recursive=True))
        if not matches:
            raise DataError(f"{source}: the glob matched no files")
        candidates: list[Path] = []
        for m in matches:
            candidates.extend(_walk(m) if m.is_dir() else [m])
    elif path.is_dir():
        candidates = _walk(path)
    elif path.exists():
        if path.suffix.lower() not in FORMATS:
            raise DataError(f"{path}: unsupported file format {path.suffix or '(no extension)'!r}; supported: {SUPPORTED}")
        return [path], []
    else:
        raise DataError(f"{source}: no such file or directory")
    files = [p for p in candidates if p.suffix.lower() in FORMATS]
    skipped = [p for p in candidates if p.suffix.lower() not in FORMATS]
    if not files:
        found = ", ".join(str(p) for p in skipped[:5]) or "no files"
        raise DataError(f"{source}: no files of a supported format (found: {found}); supported: {SUPPORTED}")
    return files, skipped


def _walk(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not _hidden(p, root))


# --------------------------------------------------------------------------- per-format readers


def _open(path: Path) -> IO[bytes]:
    try:
        return open(path, "rb")  # noqa: SIM115 - every caller closes it with `with`
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e


def _text_doc(text: str, field: str, where: str) -> str:
    if not isinstance(text, str):
        raise DataError(f"{where}: field {field!r} must be a string, got {type(text).__name__}")
    return text


def _missing_field(where: str, field: str, present: list[str]) -> DataError:
    return DataError(
        f"{where}: missing text field {field!r}; fields present: {', '.join(map(str, present)) or '(none)'} "
        "(set collect.text_field to the field that holds the text)"
    )


def _doc_from_object(obj: Any, cfg: CollectConfig, where: str, default_id: str, label: str) -> dict:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if cfg.text_field not in obj:
        raise _missing_field(where, cfg.text_field, list(obj))
    text = _text_doc(obj[cfg.text_field], cfg.text_field, where)
    doc_id = obj.get(cfg.id_field)
    return {"id": default_id if doc_id is None else str(doc_id), "text": text, "source": label}


def _read_text(path: Path, label: str, html: bool) -> Iterator[dict]:
    """A whole file as one document (HTML: markup is stripped by the clean stage)."""
    with _open(path) as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        text = _decode_declared_charset(data) if html else None
        if text is None:
            line = data.count(b"\n", 0, e.start) + 1
            raise DataError(f"{label}: invalid UTF-8 at byte offset {e.start} (line {line})") from e
    doc = {"id": label, "text": text, "source": label}
    if html:
        doc["format"] = "html"
    yield doc


def _text_lines(f: IO[bytes], label: str) -> Iterator[str]:
    """Lines of a UTF-8 text file, line ends kept; invalid UTF-8 is located by file offset and line."""
    offset = 0
    for lineno, raw in enumerate(f, start=1):
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{label}: invalid UTF-8 at byte offset {offset + e.start} (line {lineno})") from e
        offset += len(raw)


def _read_plain(path: Path, label: str, max_doc_chars: int) -> Iterator[dict]:
    """A .txt/.md file: one document, or ``label#1``, ``label#2``, ... when it is longer than
    ``max_doc_chars`` (cut at blank lines, ``chatforge.data.split``). Read line by line."""
    with _open(path) as f:
        pieces = split_text(_text_lines(f, label), max_doc_chars)
        first = next(pieces, None)
        second = next(pieces, None)
        if second is None:  # short (or blank: still one document, which the clean report accounts for)
            yield {"id": label, "text": first or "", "source": label}
            return
        for k, text in enumerate(itertools.chain((first, second), pieces), start=1):
            yield {"id": f"{label}#{k}", "text": text, "source": label}


_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?([A-Za-z0-9_\-]+)""", re.IGNORECASE)


def _decode_declared_charset(data: bytes) -> str | None:
    """Decode an HTML page with the charset its <meta> tag declares (pages are often Latin-1)."""
    m = _META_CHARSET.search(data[:4096])
    if not m:
        return None
    try:
        return data.decode(m.group(1).decode("ascii"))
    except (LookupError, UnicodeDecodeError):
        return None


def _read_jsonl(path: Path, cfg: CollectConfig, label: str) -> Iterator[dict]:
    with _open(path) as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            where = f"{label}:{lineno}"
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{where}: invalid UTF-8 at byte {e.start} of the line") from e
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: malformed JSON: {e.msg} (column {e.colno})") from e
            yield _doc_from_object(obj, cfg, where, where, label)


def _read_json(path: Path, cfg: CollectConfig, label: str) -> Iterator[dict]:
    with _open(path) as f:
        for index, line, obj in iter_json_values(f, label):
            yield _doc_from_object(obj, cfg, f"{label}:{line} (element {index})", f"{label}[{index}]", label)


def _decoded_lines(f: IO[bytes], label: str) -> Iterator[str]:
    """Lines of a binary file as text; invalid UTF-8 is located by line."""
    for lineno, raw in enumerate(f, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{label}:{lineno}: invalid UTF-8 at byte {e.start} of the line") from e
        yield line.removeprefix("\ufeff") if lineno == 1 else line


def _read_csv(path: Path, cfg: CollectConfig, label: str) -> Iterator[dict]:
    # Documents can be longer than csv's default 128 KiB field limit.
    csv.field_size_limit(2**31 - 1)
    with _open(path) as f:
        reader = csv.reader(_decoded_lines(f, label))
        try:
            header = next(reader, None)
            if header is None:
                return
            if cfg.text_field not in header:
                raise _missing_field(f"{label}:1", cfg.text_field, header)
            text_col = header.index(cfg.text_field)
            id_col = header.index(cfg.id_field) if cfg.id_field in header else None
            while True:
                start = reader.line_num + 1
                row = next(reader, None)
                if row is None:
                    break
                if not row:
                    continue  # a blank line
                where = f"{label}:{start}"
                if text_col >= len(row):
                    raise DataError(f"{where}: row has {len(row)} fields, the header has {len(header)}; "
                                    f"no value for column {cfg.text_field!r}")
                doc_id = row[id_col] if id_col is not None and id_col < len(row) and row[id_col] else where
                yield {"id": doc_id, "text": row[text_col], "source": label}
        except csv.Error as e:
            raise DataError(f"{label}:{reader.line_num}: malformed CSV: {e}") from e


def _read_parquet(path: Path, cfg: CollectConfig, label: str) -> Iterator[dict]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    with _open(path) as f:
        try:
            pf = pq.ParquetFile(f)
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{label}: not a readable Parquet file: {e}") from e
        schema = pf.schema_arrow
        if cfg.text_field not in schema.names:
            raise _missing_field(label, cfg.text_field, schema.names)
        text_type = schema.field(cfg.text_field).type
        if not (pa.types.is_string(text_type) or pa.types.is_large_string(text_type)
                or getattr(pa.types, "is_string_view", lambda t: False)(text_type)):
            raise DataError(f"{label}: field {cfg.text_field!r} must be a string column, got type {text_type}")
        columns = [cfg.text_field] + ([cfg.id_field] if cfg.id_field in schema.names else [])
        row = 0
        try:
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns):
                texts = batch.column(0).to_pylist()
                ids = batch.column(1).to_pylist() if len(columns) > 1 else [None] * len(texts)
                for text, doc_id in zip(texts, ids):
                    row += 1
                    where = f"{label}: row {row}"
                    if text is None:
                        raise DataError(f"{where}: field {cfg.text_field!r} is null")
                    yield {"id": f"{label}:{row}" if doc_id is None else str(doc_id), "text": text, "source": label}
        except (pa.ArrowException, UnicodeDecodeError) as e:
            raise DataError(f"{label}: rows after {row}: cannot decode: {e}") from e


def read_file(path: Path, cfg: CollectConfig, label: str | None = None) -> Iterator[dict]:
    """Yield the documents of one file, reading it by its extension.

    ``label`` (default: the path) names the file in ids, ``source`` and errors.
    """
    label = label or str(path)
    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{label}: unsupported file format {path.suffix or '(no extension)'!r}; supported: {SUPPORTED}")
    if kind == "text" and cfg.max_doc_chars > 0:
        return _read_plain(path, label, cfg.max_doc_chars)
    if kind in ("text", "html"):
        return _read_text(path, label, html=kind == "html")
    readers = {"jsonl": _read_jsonl, "json": _read_json, "csv": _read_csv, "parquet": _read_parquet}
    return readers[kind](path, cfg, label)


# --------------------------------------------------------------------------- remote sources


def _iter_hf(source: str, cfg: CollectConfig) -> Iterator[dict]:
    """``hf:NAME`` or ``hf:NAME:CONFIG``: a Hugging Face dataset, streamed."""
    name, _, config = source[len("hf:"):].partition(":")
    try:
        import datasets
    except ImportError as e:
        raise ChatforgeError(
            f"{source}: the Hugging Face `datasets` package is not installed; "
            "install it with `pip install 'chatforge[hf]'` or use a local file"
        ) from e
    try:
        ds = datasets.load_dataset(name, config or None, split=cfg.hf_split, streaming=True)
        for i, row in enumerate(ds):
            yield _doc_from_object(row, cfg, f"{source} (split {cfg.hf_split}) row {i}", f"{source}:{i}", source)
    except ChatforgeError:
        raise
    except Exception as e:  # network, auth, unknown dataset/split: all surface here
        raise ChatforgeError(
            f"{source}: cannot load split {cfg.hf_split!r}: {e} "
            "(hf: sources need network access or a local Hugging Face cache)"
        ) from e


def _url_suffix(url: str, content_type: str) -> str:
    suffix = Path(urllib.parse.urlparse(url).path).suffix.lower()
    if suffix in FORMATS:
        return suffix
    if content_type in _CONTENT_TYPES:
        return _CONTENT_TYPES[content_type]
    raise DataError(f"{url}: cannot tell the format (path suffix {suffix or 'none'!r}, "
                    f"Content-Type {content_type!r}); supported: {SUPPORTED}")


def _iter_url(url: str, cfg: CollectConfig) -> Iterator[dict]:
    """An http(s) URL: downloaded to a temporary file (streamed), then read by format."""
    try:
        response = urllib.request.urlopen(url, timeout=_URL_TIMEOUT_S)
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise ChatforgeError(f"{url}: cannot download: {reason} (URL sources need network access)") from e
    with response, tempfile.TemporaryDirectory(prefix="chatforge-url-") as tmp:
        suffix = _url_suffix(url, response.headers.get_content_type())
        path = Path(tmp) / f"download{suffix}"
        try:
            with open(path, "wb") as f:
                shutil.copyfileobj(response, f, length=1 << 20)
        except OSError as e:
            raise ChatforgeError(f"{url}: download failed: {e}") from e
        yield from read_file(path, cfg, label=url)


# --------------------------------------------------------------------------- public API


def iter_documents(source: str, cfg: CollectConfig, skipped: list[Path] | None = None) -> Iterator[dict]:
    """Yield the documents of one source: a file, directory, glob, ``hf:NAME`` or URL.

    Each document is ``{"id", "text", "source"}`` (``"format": "html"`` for HTML
    files). Files of a directory or glob come in sorted order, so the stream is
    deterministic. Files skipped for their format are appended to ``skipped``.
    """
    if source.startswith("hf:"):
        yield from _iter_hf(source, cfg)
        return
    if source.startswith(("http://", "https://")):
        yield from _iter_url(source, cfg)
        return
    files, skipped_here = expand_source(source)
    if skipped is not None:
        skipped.extend(skipped_here)
    for path in files:
        yield from read_file(path, cfg)


def _json_line(doc: dict) -> str:
    try:
        line = dumps_line(doc)
        line.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (from "\ud800" escapes in the input) cannot be UTF-8: keep them
        # escaped; the clean stage removes them.
        line = json.dumps(doc, ensure_ascii=True)
    return line + "\n"


def collect(sources: list[str], out_path: Path, cfg: CollectConfig) -> dict[str, Any]:
    """Stream every document of ``sources`` into ``out_path`` (JSONL, written atomically).

    Stops after ``cfg.max_docs`` documents when it is > 0. Returns stats: documents,
    characters, documents per source, skipped files, wall time and MB/s. An empty
    corpus raises ``DataError`` naming the sources, and leaves ``out_path`` as it was.
    """
    if not sources:
        raise DataError("collect: no sources given (collect.sources is empty)")
    t0 = time.perf_counter()
    docs = chars = 0
    per_source: dict[str, int] = {}
    skipped: list[Path] = []
    with atomic_write(out_path) as f:
        for source in sources:
            per_source.setdefault(source, 0)
            if cfg.max_docs and docs >= cfg.max_docs:
                break
            for doc in iter_documents(source, cfg, skipped):
                line = _json_line(doc)
                f.write(line)
                docs += 1
                chars += len(doc["text"])
                per_source[source] += 1
                if cfg.max_docs and docs >= cfg.max_docs:
                    break
        if docs == 0:
            raise DataError(f"empty corpus: no documents found in {', '.join(sources)}")
        f.flush()
        nbytes = os.fstat(f.fileno()).st_size
    wall = time.perf_counter() - t0
    return {
        "docs": docs,
        "chars": chars,
        "sources": per_source,
        "skipped_files": [str(p) for p in skipped],
        "wall_time_s": round(wall, 3),
        "mb_per_s": round(nbytes / 1e6 / max(wall, 1e-9), 2),
    }
