"""Document quality heuristics in the style of Gopher (Rae et al. 2021) and FineWeb.

Each rule has a name (used as the key in ``clean_report.json``), the config fields
that set it, and a check that returns why a document fails it, or ``None``. A
document is dropped by the first rule it fails, in the order of ``RULES``.

Words are whitespace-separated tokens; lines are the non-blank lines of the text.
Ratio rules are skipped for a document with no words (``too_short`` catches
those unless ``min_words`` is 0).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from chatforge.config import CleanConfig

BULLETS = ("•", "‣", "◦", "⁃", "▪", "▫", "●", "○", "■", "□", "➢", "–", "-", "*", "·")
# A whitespace-delimited token with no letter in it (digits, punctuation, symbols only).
_NO_LETTER_WORD = re.compile(r"(?<!\S)(?:[\d_]|[^\w\s])+(?!\S)")


@dataclass(frozen=True)
class DocStats:
    """The measurements the rules look at, computed once per document."""

    chars: int
    words: int
    mean_word_len: float
    hash_per_word: float
    ellipsis_per_word: float
    alpha_word_frac: float
    lines: int
    bullet_line_frac: float
    ellipsis_line_frac: float
    dup_line_frac: float
    dup_line_char_frac: float


def doc_stats(text: str) -> DocStats:
    words = text.split()
    n_words = len(words)
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    n_lines = len(lines)
    seen: set[str] = set()
    dup_lines = dup_chars = line_chars = 0
    for line in lines:
        line_chars += len(line)
        if line in seen:
            dup_lines += 1
            dup_chars += len(line)
        else:
            seen.add(line)
    per_word = max(n_words, 1)
    per_line = max(n_lines, 1)
    return DocStats(
        chars=len(text),
        words=n_words,
        mean_word_len=sum(map(len, words)) / per_word,
        hash_per_word=text.count("#") / per_word,
        ellipsis_per_word=(text.count("...") + text.count("…")) / per_word,
        alpha_word_frac=(n_words - len(_NO_LETTER_WORD.findall(text))) / per_word,
        lines=n_lines,
        bullet_line_frac=sum(1 for line in lines if line.startswith(BULLETS)) / per_line,
        ellipsis_line_frac=sum(1 for line in lines if line.endswith(("...", "…"))) / per_line,
        dup_line_frac=dup_lines / per_line,
        dup_line_char_frac=dup_chars / max(line_chars, 1),
    )


@dataclass(frozen=True)
class Rule:
    name: str
    fields: tuple[str, ...]  # the CleanConfig fields that set it
    describe: str
    check: Callable[[DocStats, CleanConfig], str | None]


def _too_short(s: DocStats, c: CleanConfig) -> str | None:
    if s.chars < c.min_chars:
        return f"{s.chars} chars < min_chars {c.min_chars}"
    if s.words < c.min_words:
        return f"{s.words} words < min_words {c.min_words}"
    return None


def _too_long(s: DocStats, c: CleanConfig) -> str | None:
    return f"{s.words} words > max_words {c.max_words}" if s.words > c.max_words else None


def _mean_word_len(s: DocStats, c: CleanConfig) -> str | None:
    if s.words == 0 or c.min_mean_word_len <= s.mean_word_len <= c.max_mean_word_len:
        return None
    return (f"mean word length {s.mean_word_len:.2f} outside "
            f"[min_mean_word_len {c.min_mean_word_len}, max_mean_word_len {c.max_mean_word_len}]")


def _symbol_ratio(s: DocStats, c: CleanConfig) -> str | None:
    if s.words == 0:
        return None
    if s.hash_per_word > c.max_symbol_word_ratio:
        return f"'#' per word {s.hash_per_word:.3f} > max_symbol_word_ratio {c.max_symbol_word_ratio}"
    if s.ellipsis_per_word > c.max_symbol_word_ratio:
        return f"ellipses per word {s.ellipsis_per_word:.3f} > max_symbol_word_ratio {c.max_symbol_word_ratio}"
    return None


def _alpha_words(s: DocStats, c: CleanConfig) -> str | None:
    if s.words == 0 or s.alpha_word_frac >= c.min_alpha_word_frac:
        return None
    return f"words with a letter {s.alpha_word_frac:.2f} < min_alpha_word_frac {c.min_alpha_word_frac}"


def _bullet_lines(s: DocStats, c: CleanConfig) -> str | None:
    if s.lines == 0 or s.bullet_line_frac <= c.max_bullet_line_frac:
        return None
    return f"bullet lines {s.bullet_line_frac:.2f} > max_bullet_line_frac {c.max_bullet_line_frac}"


def _ellipsis_lines(s: DocStats, c: CleanConfig) -> str | None:
    if s.lines == 0 or s.ellipsis_line_frac <= c.max_ellipsis_line_frac:
        return None
    return f"lines ending in an ellipsis {s.ellipsis_line_frac:.2f} > max_ellipsis_line_frac {c.max_ellipsis_line_frac}"


def _dup_lines(s: DocStats, c: CleanConfig) -> str | None:
    if s.lines == 0 or s.dup_line_frac <= c.max_dup_line_frac:
        return None
    return f"repeated lines {s.dup_line_frac:.2f} > max_dup_line_frac {c.max_dup_line_frac}"


def _dup_line_chars(s: DocStats, c: CleanConfig) -> str | None:
    if s.lines == 0 or s.dup_line_char_frac <= c.max_dup_line_char_frac:
        return None
    return (f"characters in repeated lines {s.dup_line_char_frac:.2f} > "
            f"max_dup_line_char_frac {c.max_dup_line_char_frac}")


RULES: tuple[Rule, ...] = (
    Rule("too_short", ("min_chars", "min_words"), "fewer characters or words than the minimum", _too_short),
    Rule("too_long", ("max_words",), "more words than the maximum", _too_long),
    Rule("mean_word_length", ("min_mean_word_len", "max_mean_word_len"),
         "mean word length out of range (gibberish, tables of numbers, URLs)", _mean_word_len),
    Rule("symbol_word_ratio", ("max_symbol_word_ratio",),
         "too many '#' or ellipses per word (hashtag spam, truncated snippets)", _symbol_ratio),
    Rule("too_few_alpha_words", ("min_alpha_word_frac",), "too few words containing a letter", _alpha_words),
    Rule("bullet_lines", ("max_bullet_line_frac",), "too many lines starting with a bullet (menus, link lists)",
         _bullet_lines),
    Rule("ellipsis_lines", ("max_ellipsis_line_frac",), "too many lines ending in an ellipsis (teasers)",
         _ellipsis_lines),
    Rule("dup_lines", ("max_dup_line_frac",), "too many lines repeating an earlier line of the document",
         _dup_lines),
    Rule("dup_line_chars", ("max_dup_line_char_frac",), "too many characters in repeated lines", _dup_line_chars),
)


def first_failure(text: str, cfg: CleanConfig) -> tuple[str, str] | None:
    """``(rule name, reason)`` of the first rule the text fails, or ``None`` if it passes all."""
    stats = doc_stats(text)
    for rule in RULES:
        reason = rule.check(stats, cfg)
        if reason is not None:
            return rule.name, reason
    return None
