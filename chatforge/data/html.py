"""HTML to plain text, keeping the block structure as line breaks.

Extractor: selectolax with its Lexbor parser. It is a fast C HTML5 parser (a page
takes well under a millisecond) with no lxml dependency, which matters when the
clean stage runs it over millions of pages in worker processes. trafilatura was
the alternative: it adds main-content detection, but it is heavier (lxml,
justext, several dependencies), several times slower, and its boilerplate
detection is tuned for web news articles, whereas our sources are mixed (help
pages, product pages, docs). We instead drop the elements that are boilerplate
in nearly every page (scripts, styles, navigation, headers, footers, sidebars,
forms) and let the quality heuristics of the clean stage judge what remains.
"""

from __future__ import annotations

import re

from selectolax.lexbor import LexborHTMLParser, LexborNode

# Elements whose whole subtree is never article text.
DROP_TAGS = [
    "script", "style", "noscript", "nav", "header", "footer", "aside", "form", "template",
    "iframe", "svg", "canvas", "button", "select", "object", "embed", "head",
]
# Elements that start a paragraph (blank line around them) or a new line.
_PARAGRAPH = {
    "p", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "blockquote", "table", "ul", "ol", "dl",
    "section", "article", "main", "figure", "hr", "address", "details", "summary", "fieldset",
}
_LINE = {"div", "li", "tr", "dt", "dd", "caption", "figcaption", "br", "option", "legend"}
_CELL = {"td", "th"}

_SPACES = re.compile(r"\s+")
_BLANK_LINES = re.compile(r"\n{3,}")


def _children(node: LexborNode) -> list[LexborNode]:
    out = []
    child = node.child
    while child is not None:
        out.append(child)
        child = child.next
    return out


class _TextBuilder:
    """Accumulates text; line breaks and cell spaces are deferred so they never pile up."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.last = "\n"  # last character emitted; a newline means "at the start of a line"
        self.pending_newlines = 0
        self.pending_space = False

    def newline(self, n: int) -> None:
        self.pending_newlines = max(self.pending_newlines, n)

    def space(self) -> None:
        self.pending_space = True

    def text(self, text: str, pre: bool) -> None:
        if not pre:
            text = _SPACES.sub(" ", text)
            if text == " " or not text:
                self.pending_space = True
                return
        if self.pending_newlines and self.parts:
            self.parts.append("\n" * self.pending_newlines)
            self.last = "\n"
        elif self.pending_space and self.last not in " \n":
            self.parts.append(" ")
            self.last = " "
        self.pending_newlines, self.pending_space = 0, False
        if not pre and self.last in " \n":
            text = text.lstrip(" ")
        if text:
            self.parts.append(text)
            self.last = text[-1]

    def result(self) -> str:
        lines = [line.rstrip() for line in "".join(self.parts).split("\n")]
        return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


def _block_break(out: _TextBuilder, tag: str) -> None:
    if tag in _PARAGRAPH:
        out.newline(2)
    elif tag in _LINE:
        out.newline(1)
    elif tag in _CELL:
        out.space()


def html_to_text(html: str) -> str:
    """The visible text of an HTML document or fragment, one block per line.

    Text inside ``<pre>`` keeps its whitespace; elsewhere runs of whitespace
    collapse to one space, as a browser renders them. Blocks are separated by a
    line break, paragraphs and headings by a blank line, table cells by a space.
    """
    tree = LexborHTMLParser(html)
    tree.strip_tags(DROP_TAGS, recursive=True)
    root = tree.body or tree.root
    if root is None:
        return ""
    out = _TextBuilder()
    in_pre = 0
    # Depth-first walk with explicit enter/exit events (pages can nest deeper than
    # Python's recursion limit).
    stack: list[tuple[LexborNode, bool]] = [(root, False)]
    while stack:
        node, leaving = stack.pop()
        if leaving:
            if node.tag == "pre":
                in_pre -= 1
            _block_break(out, node.tag)
        elif node.is_text_node:
            out.text(node.text_content or "", pre=in_pre > 0)
        elif node.is_element_node:  # comments and doctypes carry no text
            _block_break(out, node.tag)
            if node.tag == "pre":
                in_pre += 1
            stack.append((node, True))
            stack.extend((child, False) for child in reversed(_children(node)))
    return out.result()
