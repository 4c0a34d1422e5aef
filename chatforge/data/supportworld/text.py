"""Text helpers shared by the SupportWorld generators: seeds, templates, typos, formatting.

Templates are plain strings with two kinds of slots:

* ``[a|b|c]`` picks one alternative at random (alternatives may be empty, ``[very |]``,
  and groups may nest: ``[a [big|small] one|another]``);
* ``{name}`` is replaced by ``values[name]``.

So one template line stands for many paraphrases, which is what keeps generated
documents from being near-duplicates of each other.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import re
from collections.abc import Mapping, Sequence
from typing import Any

_ALT = re.compile(r"\[([^\[\]]*)\]")  # an innermost [a|b|c] group
_VAR = re.compile(r"\{(\w+)\}")
_SPACES = re.compile(r"[ \t]{2,}")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:!?])")

MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")


def derive_seed(seed: int, *names: object) -> int:
    """A 63-bit seed for one component, stable across Python versions and processes.

    Each generator gets its own ``random.Random(derive_seed(cfg.seed, "reviews"))`` so that
    changing how much one component produces never shifts the random stream of another.
    """
    key = ":".join([str(seed), *map(str, names)]).encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") >> 1


def rng_for(seed: int, *names: object) -> random.Random:
    return random.Random(derive_seed(seed, *names))


def expand(template: str, rng: random.Random, values: Mapping[str, Any] | None = None) -> str:
    """Resolve ``[a|b]`` choices (innermost first) and ``{name}`` slots, then tidy spacing."""
    text = template
    while "[" in text:
        text = _ALT.sub(lambda m: rng.choice(m.group(1).split("|")), text)
    if values is not None:
        text = _VAR.sub(lambda m: str(values[m.group(1)]), text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    return text.strip()


def sentence(template: str, rng: random.Random, values: Mapping[str, Any] | None = None) -> str:
    """``expand`` with the first letter capitalised."""
    return capitalize(expand(template, rng, values))


def capitalize(text: str) -> str:
    return text[:1].upper() + text[1:] if text else text


def pick(rng: random.Random, options: Sequence[Any]) -> Any:
    return options[rng.randrange(len(options))]


def join_words(items: Sequence[str], conj: str = "and") -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    items = list(items)
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + f" {conj} " + items[-1]


def a_an(word: str) -> str:
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def fmt_date(day: dt.date) -> str:
    """The date style every assistant answer uses: ``May 9, 2024``."""
    return f"{MONTHS[day.month - 1]} {day.day}, {day.year}"


def fmt_date_short(day: dt.date) -> str:
    """``May 9``: how customers tend to write dates."""
    return f"{MONTHS[day.month - 1]} {day.day}"


def fmt_money(amount: float) -> str:
    return f"${amount:,.2f}"


def parse_date(iso: str) -> dt.date:
    return dt.date.fromisoformat(iso)


WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")


def weekday(day: dt.date) -> str:
    return WEEKDAYS[day.weekday()]


def add_months(day: dt.date, months: int) -> dt.date:
    """``months`` calendar months after ``day`` (on the 28th at most, so every month has the day)."""
    y, m = divmod(day.month - 1 + months, 12)
    return dt.date(day.year + y, m + 1, min(day.day, 28))


def add_business_days(day: dt.date, n: int) -> dt.date:
    """``day`` plus ``n`` working days (Monday to Friday); carriers do not count weekends."""
    step = 1 if n >= 0 else -1
    left = abs(n)
    while left:
        day += dt.timedelta(days=step)
        if day.weekday() < 5:
            left -= 1
    return day


def sample_lines(rng: random.Random, templates: Sequence[str], k: int, values: Mapping[str, Any]) -> list[str]:
    """``k`` distinct templates (fewer if there are not enough), expanded as sentences, in random order."""
    return [sentence(t, rng, values) for t in rng.sample(list(templates), min(k, len(templates)))]


def paragraph(rng: random.Random, templates: Sequence[str], k: int, values: Mapping[str, Any]) -> str:
    return " ".join(sample_lines(rng, templates, k, values))


def bullet_list(items: Sequence[str], rng: random.Random) -> str:
    """A Markdown list; the bullet style varies between documents like it does on real sites."""
    mark = rng.choice(("-", "-", "*"))
    return "\n".join(f"{mark} {item}" for item in items)


def numbered_list(items: Sequence[str]) -> str:
    return "\n".join(f"{i}. {item}" for i, item in enumerate(items, start=1))


# --------------------------------------------------------------------------- typos

# Neighbouring keys on a QWERTY keyboard, for substitution typos.
_NEIGHBOURS = {
    "a": "qsz", "b": "vgn", "c": "xvd", "d": "sfe", "e": "wrd", "f": "dgr", "g": "fht", "h": "gjy",
    "i": "uok", "j": "hku", "k": "jli", "l": "ko", "m": "nj", "n": "bmh", "o": "ipl", "p": "ol",
    "q": "wa", "r": "eft", "s": "adw", "t": "rgy", "u": "yji", "v": "cbf", "w": "qes", "x": "zc",
    "y": "tuh", "z": "xa",
}


def typo_word(word: str, rng: random.Random) -> str:
    """One plausible typing error: swapped, dropped, doubled or neighbouring-key letter."""
    if len(word) < 4:
        return word
    i = rng.randrange(1, len(word) - 1)  # keep the first letter: people rarely mistype it
    kind = rng.randrange(4)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    c = word[i].lower()
    return word[:i] + rng.choice(_NEIGHBOURS.get(c, c)) + word[i + 1:]


def add_typos(text: str, rng: random.Random, n: int = 1) -> str:
    """Put ``n`` typos into alphabetic words of 4+ letters; ids, numbers and emails stay intact."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w) >= 4 and w.isalpha()]
    for i in rng.sample(candidates, min(n, len(candidates))):
        words[i] = typo_word(words[i], rng)
    return " ".join(words)


def casual(text: str, rng: random.Random) -> str:
    """How some customers type: lower case (ids kept), sometimes without the final full stop."""
    text = " ".join(w if any(c.isdigit() for c in w) else w.lower() for w in text.split(" "))
    if text.endswith(".") and rng.random() < 0.5:
        text = text[:-1]
    return text
