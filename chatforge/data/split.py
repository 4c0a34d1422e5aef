"""Cut a long plain text (a book, a manual) into documents of at most ``max_chars``.

A plain-text file has no document boundaries of its own, so ``collect`` cuts it
where the text does: at blank lines between paragraphs, preferring the start of a
Markdown heading (``# Title``) once the document is at least half full. A paragraph
longer than ``max_chars`` is cut between lines, and a line longer than that at its
last whitespace before the limit (mid-word only when a line has none).

Nothing is rewritten: every document is an exact slice of the text, and what lies
between two consecutive documents is whitespace (the blank lines or the line
break or space at the cut), so the documents joined by those separators are the
original text. The text is read line by line and at most one document is held at
a time, so memory does not grow with the file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import NamedTuple

_HEADING = re.compile(r"#{1,6}(?:\s|$)")
_CUT = re.compile(r"\s+(?=\S)")  # whitespace a long line can be cut at


class _Unit(NamedTuple):
    gap: str  # the whitespace between the previous unit and this one (dropped when a document starts here)
    body: str  # text with no blank line inside at its ends
    heading: bool  # starts a paragraph that is a Markdown heading


def _split_line(line: str, max_chars: int) -> Iterator[tuple[str, str]]:
    """``(gap, piece)`` pieces of one over-long line, each at most ``max_chars`` and not blank, cut at
    the last whitespace before the limit (mid-word where there is none); the gaps are the whitespace
    at the cuts."""
    gap, start = "", 0
    while len(line) - start > max_chars:
        if not line[start:start + max_chars].strip():  # indentation longer than a piece: it is a gap
            gap, start = gap + line[start:start + max_chars], start + max_chars
            continue
        first = start + len(line[start:start + max_chars]) - len(line[start:start + max_chars].lstrip())
        cut = None
        for m in _CUT.finditer(line, first + 1, start + max_chars + 1):
            cut = m
        if cut is None:  # no whitespace to cut at: cut mid-word
            yield gap, line[start:start + max_chars]
            gap, start = "", start + max_chars
        else:
            yield gap, line[start:cut.start()]
            gap, start = cut.group(), cut.end()
    yield gap, line[start:]


def _units(lines: Iterable[str], max_chars: int) -> Iterator[_Unit]:
    """Paragraphs as units (an over-long one in pieces of at most ``max_chars``)."""
    gap = ""  # whitespace since the last unit's body
    para: list[str] = []  # lines of the paragraph being read (the last one without its line end)
    size = 0
    heading = False
    pending_end = ""  # the line end of the paragraph's last line so far

    def flush() -> Iterator[_Unit]:
        nonlocal gap, para, size, heading
        body = "".join(para)
        if body.strip():
            yield _Unit(gap, body, heading)
            gap = ""
        else:  # only the blank tail of a cut line: whitespace, like a gap
            gap += body
        para, size, heading = [], 0, False

    for line in lines:
        content = line.rstrip("\r\n")
        end = line[len(content):]
        if not content.strip():  # a blank line ends the paragraph
            yield from flush()
            gap += pending_end + line
            pending_end = ""
            continue
        if para and size + len(pending_end) + len(content) > max_chars:  # too long: cut between lines
            yield from flush()
            gap += pending_end
        elif para:
            para.append(pending_end)
            size += len(pending_end)
        if not para:
            heading = bool(_HEADING.match(content))
        if len(content) > max_chars:  # one line alone is too long: cut at whitespace
            pieces = list(_split_line(content, max_chars))
            for piece_gap, piece in pieces[:-1]:
                yield _Unit(gap + piece_gap, piece, heading)
                gap, heading = "", False
            gap += pieces[-1][0]
            content = pieces[-1][1]
        para.append(content)
        size += len(content)
        pending_end = end
    yield from flush()


def split_text(lines: Iterable[str], max_chars: int) -> Iterator[str]:
    """Documents of at most ``max_chars`` characters cut from the text given as ``lines``
    (each with its line end, as a file yields them). Whitespace-only text yields nothing."""
    if max_chars < 1:
        raise ValueError(f"max_chars must be >= 1, got {max_chars}")
    doc: list[str] = []
    size = 0
    for unit in _units(lines, max_chars):
        starts_section = unit.heading and size >= max_chars // 2
        if doc and (starts_section or size + len(unit.gap) + len(unit.body) > max_chars):
            yield "".join(doc)
            doc, size = [], 0
        if doc:
            doc.append(unit.gap)
            size += len(unit.gap)
        doc.append(unit.body)
        size += len(unit.body)
    if doc:
        yield "".join(doc)
