"""Small I/O helpers shared by every stage: atomic writes, JSON with a nesting limit, JSONL with located errors.

Every file a stage produces is written to a temporary file next to its target and
renamed into place only once complete, so a crash or a bad input never leaves a
half-written or corrupted output behind, and earlier outputs stay intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from chatforge.errors import DataError

# Deeper JSON than this is refused where untrusted input is parsed (request bodies, imported rows):
# real chat/label data nests 3-6 levels, and a deeply nested value would make later recursive code
# (json.dumps, validation) fail with RecursionError far from where it came in.
MAX_JSON_DEPTH = 32


class JSONTooDeep(ValueError):
    """JSON nested deeper than the allowed depth."""


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_BRACKET_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}


def json_nesting(text: str) -> int:
    """How deeply the containers of a *valid* JSON text nest (``[]`` is 1, ``{"a": [1]}`` is 2).

    Works on the text with C-speed regex and ``accumulate`` rather than walking the parsed value,
    so a 1 MB body of scalars costs milliseconds. Only for text ``json.loads`` accepted: there every
    quote outside a string opens one that closes, so the string pattern runs in linear time."""
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text))
    return max(itertools.accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def parse_json(text: str | bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """``json.loads`` that refuses nesting deeper than ``max_depth`` with ``JSONTooDeep``.

    Bytes must be UTF-8 (``UnicodeDecodeError`` otherwise); malformed JSON raises
    ``json.JSONDecodeError`` as usual; nesting deep enough to exhaust the parser's recursion
    becomes ``JSONTooDeep`` too, never a ``RecursionError``."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8")
    try:
        obj = json.loads(text)
    except RecursionError:
        raise JSONTooDeep(f"JSON nested more than {max_depth} levels deep") from None
    if text.count("[") + text.count("{") > max_depth and json_nesting(text) > max_depth:
        raise JSONTooDeep(f"JSON nested more than {max_depth} levels deep")
    return obj


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temp file beside ``path``; on success fsync and rename it over ``path``.

    On any exception the temp file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as pretty JSON, atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=False)
        f.write("\n")


# JSON leaves these three line breaks raw inside strings (only C0 controls must be escaped), yet
# Python's str.splitlines(), many editors and JavaScript before ES2019 split lines on them, so a
# model that happens to emit one would break a JSONL file for every reader but ours. They can occur
# only inside JSON strings, so escaping them there is exact and the file stays one record per line.
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def dumps_line(obj: Any) -> str:
    """``obj`` as one JSON line (UTF-8 kept readable) that no line splitter can break apart."""
    return json.dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines, atomically; returns the number of rows."""
    n = 0
    with atomic_write(path) as f:
        for row in rows:
            f.write(dumps_line(row))
            f.write("\n")
            n += 1
    return n


def read_jsonl(path: str | os.PathLike, max_depth: int | None = None) -> Iterator[tuple[int, dict]]:
    """Yield ``(line_number, object)`` for each non-blank line of a JSONL file.

    Streams the file (constant memory). Invalid UTF-8, malformed JSON, lines that
    are not JSON objects and (with ``max_depth``, or past the parser's recursion
    limit) too deeply nested lines raise ``DataError`` naming the file and line.
    """
    path = Path(path)
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below; binary so bad UTF-8 is located per line
    except OSError as e:
        raise DataError(f"{path}: cannot read file: {e.strerror or e}") from e
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid UTF-8 at byte {e.start} of the line") from e
            try:
                obj = parse_json(line, max_depth) if max_depth is not None else json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON: {e.msg} (column {e.colno})") from e
            except JSONTooDeep as e:
                raise DataError(f"{path}:{lineno}: {e}") from e
            except RecursionError:
                raise DataError(f"{path}:{lineno}: JSON nested too deeply to parse") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
