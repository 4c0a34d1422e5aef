"""Stream the elements of a top-level JSON array without loading the whole file.

``json.load`` needs the whole document in memory. A ``.json`` corpus is usually
one big array of objects, so we read it in chunks and let ``json.JSONDecoder.
raw_decode`` (the C scanner) pull one element at a time out of a buffer that only
holds the unread chunk plus the element being decoded. Memory is bounded by the
chunk size plus the largest single element, not by the file size.

A file holding a single top-level value (not an array) yields that one value.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import IO, Any

from chatforge.errors import DataError

_WHITESPACE = " \t\n\r"
_TAIL = 16  # a value cut by the chunk boundary fails within this many characters of the end


class _Buffer:
    """Decoded text of a binary stream, read on demand, with line numbers of positions."""

    def __init__(self, f: IO[bytes], label: str, chunk_size: int):
        self.f = f
        self.label = label
        self.chunk_size = chunk_size
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.text = ""
        self.pos = 0  # next unread character of self.text
        self.eof = False
        self.bytes_read = 0
        # Line numbers: newlines are counted once, up to self._counted, as positions advance.
        self._line = 1
        self._counted = 0

    def fill(self) -> bool:
        """Read one more chunk (at least doubling the unread text); False at end of file."""
        if self.eof:
            return False
        # Drop consumed text so the buffer holds only what is still needed.
        self.line_at(self.pos)
        self.text = self.text[self.pos:]
        self._counted -= self.pos
        self.pos = 0
        want = max(self.chunk_size, len(self.text))
        data = self.f.read(want)
        pending = len(self.decoder.getstate()[0])
        try:
            self.text += self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as e:
            offset = self.bytes_read - pending + e.start
            raise DataError(f"{self.label}: invalid UTF-8 at byte offset {offset}") from e
        self.bytes_read += len(data)
        if not data:
            self.eof = True
        return True

    def skip_whitespace(self) -> str:
        """Advance past whitespace; return the next character, or '' at end of file."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos] in _WHITESPACE:
                self.pos += 1
            if self.pos < len(self.text):
                return self.text[self.pos]
            if not self.fill():
                return ""

    def line_at(self, pos: int) -> int:
        if pos > self._counted:
            self._line += self.text.count("\n", self._counted, pos)
            self._counted = pos
        return self._line


def _decode_value(buf: _Buffer, decoder: json.JSONDecoder) -> Any:
    """Decode the JSON value starting at buf.pos, reading more input as needed."""
    while True:
        try:
            value, end = decoder.raw_decode(buf.text, buf.pos)
        except json.JSONDecodeError as e:
            # An error at the end of the buffer (or a string still open there) means the
            # value continues in the next chunk; anywhere else the JSON is malformed, and
            # we say so without reading the rest of a possibly huge file.
            truncated = e.pos >= len(buf.text) - _TAIL or e.msg.startswith("Unterminated string")
            if truncated and buf.fill():
                continue
            raise DataError(f"{buf.label}:{buf.line_at(e.pos)}: malformed JSON: {e.msg} (column {e.colno})") from e
        # A number at the very end of the buffer may be cut in two: read on to be sure.
        if end == len(buf.text) and not buf.eof:
            buf.fill()
            continue
        buf.pos = end
        return value


def iter_json_values(f: IO[bytes], label: str, chunk_size: int = 1 << 20) -> Iterator[tuple[int, int, Any]]:
    """Yield ``(index, line, value)`` for each element of a top-level array in ``f``.

    ``label`` names the file in error messages. A top-level value that is not an
    array is yielded alone as index 0. Malformed JSON, invalid UTF-8 and trailing
    data raise ``DataError`` naming the file and line (or byte offset).
    """
    buf = _Buffer(f, label, chunk_size)
    decoder = json.JSONDecoder()
    first = buf.skip_whitespace()
    if not first:
        return  # an empty file holds no documents
    if first != "[":
        line = buf.line_at(buf.pos)
        yield 0, line, _decode_value(buf, decoder)
    else:
        buf.pos += 1
        if buf.skip_whitespace() == "]":
            buf.pos += 1
        else:
            index = 0
            while True:
                if not buf.skip_whitespace():
                    raise DataError(f"{label}:{buf.line_at(buf.pos)}: malformed JSON: the array is not closed")
                line = buf.line_at(buf.pos)
                yield index, line, _decode_value(buf, decoder)
                index += 1
                sep = buf.skip_whitespace()
                if sep == ",":
                    buf.pos += 1
                elif sep == "]":
                    buf.pos += 1
                    break
                elif not sep:
                    raise DataError(f"{label}:{buf.line_at(buf.pos)}: malformed JSON: the array is not closed")
                else:
                    raise DataError(
                        f"{label}:{buf.line_at(buf.pos)}: malformed JSON: expected ',' or ']' after element {index - 1}, got {sep!r}"
                    )
    if buf.skip_whitespace():
        raise DataError(f"{label}:{buf.line_at(buf.pos)}: malformed JSON: extra data after the top-level value")
