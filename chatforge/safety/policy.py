"""The safety policy: categories, the rules that catch them and the action per place.

A policy is a TOML file (``default_policy.toml`` ships with chatforge and documents the
format); ``load_policy`` reads one and says which file, category and field is wrong when
something is. Places are where a check applies: ``data`` (the clean stage), ``prompt``
(a user's message in serving) and ``answer`` (the model's answer in serving).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from chatforge.data.pii import KINDS as PII_KINDS
from chatforge.errors import ConfigError

DEFAULT_POLICY = "default"  # the name that means the shipped policy file
PLACES = ("data", "prompt", "answer")
# Allowed actions per place, mildest first: the strictest action of all findings wins.
ACTIONS: dict[str, tuple[str, ...]] = {
    "data": ("keep", "flag", "drop"),
    "prompt": ("allow", "flag", "redact", "refuse"),
    "answer": ("allow", "flag", "redact", "refuse"),
}


@dataclass(frozen=True)
class Category:
    """One hazard category: what it is, how rules find it and what to do in each place."""

    code: str  # the table's key: "S1".."S14" (Llama Guard 3) or the user's own
    name: str
    description: str = ""
    data: str = "keep"
    prompt: str = "allow"
    answer: str = "allow"
    patterns: tuple[re.Pattern[str], ...] = ()
    pii: tuple[str, ...] = ()
    blocklist: bool = False
    words: tuple[str, ...] = ()
    allow_words: frozenset[str] = frozenset()  # taken out of the package word list (names, colours, identity terms)
    foreign_identifiers: tuple[re.Pattern[str], ...] = ()
    allowed_identifiers: frozenset[str] = frozenset()

    def action(self, place: str) -> str:
        return getattr(self, place)


@dataclass(frozen=True)
class Policy:
    """A loaded policy; ``source`` is the file it came from."""

    name: str
    categories: dict[str, Category]
    refusal: str
    stream_window: int = 48
    classifier: str = ""
    threshold: float = 0.5
    version: int = 1
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def category(self, name_or_code: str) -> Category:
        for c in self.categories.values():
            if name_or_code in (c.code, c.name):
                return c
        raise KeyError(name_or_code)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.categories.values()]


def default_policy_path() -> Path:
    return Path(str(resources.files("chatforge.safety") / "default_policy.toml"))


def _strs(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where}: must be a list of strings, got {value!r}")
    return tuple(value)


def _regexes(values: tuple[str, ...], where: str) -> tuple[re.Pattern[str], ...]:
    out = []
    for i, p in enumerate(values):
        try:
            out.append(re.compile(p, re.IGNORECASE))
        except re.error as e:
            raise ConfigError(f"{where}[{i}]: invalid regular expression {p!r}: {e}") from e
    return tuple(out)


_CATEGORY_FIELDS = {"name", "description", "data", "prompt", "answer", "patterns", "pii", "blocklist", "words",
                    "allow_words", "foreign_identifiers", "allowed_identifiers"}
_TOP_FIELDS = {"name", "version", "refusal", "stream_window", "classifier", "threshold", "categories"}


def parse_policy(obj: dict[str, Any], source: str) -> Policy:
    """A ``Policy`` from the TOML document ``obj``; errors name ``source`` and the field."""
    unknown = set(obj) - _TOP_FIELDS
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(sorted(unknown))}; known: "
                          f"{', '.join(sorted(_TOP_FIELDS))}")
    cats_obj = obj.get("categories")
    if not isinstance(cats_obj, dict) or not cats_obj:
        raise ConfigError(f"{source}: needs at least one [categories.CODE] table")
    cats: dict[str, Category] = {}
    names: set[str] = set()
    for code, c in cats_obj.items():
        where = f"{source}: categories.{code}"
        if not isinstance(c, dict):
            raise ConfigError(f"{where}: must be a table")
        bad = set(c) - _CATEGORY_FIELDS
        if bad:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(sorted(bad))}; known: "
                              f"{', '.join(sorted(_CATEGORY_FIELDS))}")
        name = c.get("name", code)
        if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
            raise ConfigError(f"{where}.name: {name!r} must be lower_snake_case (it becomes a label)")
        if name in names or name == "safe":
            raise ConfigError(f"{where}.name: {name!r} is used twice (or is the reserved label 'safe')")
        names.add(name)
        actions = {}
        for place in PLACES:
            a = c.get(place, ACTIONS[place][0])
            if a not in ACTIONS[place]:
                raise ConfigError(f"{where}.{place}: {a!r} is not one of {', '.join(ACTIONS[place])}")
            actions[place] = a
        pii = _strs(c.get("pii", []), f"{where}.pii")
        for k in pii:
            if k not in PII_KINDS:
                raise ConfigError(f"{where}.pii: {k!r} is not one of {', '.join(PII_KINDS)}")
        blocklist = c.get("blocklist", False)
        if not isinstance(blocklist, bool):
            raise ConfigError(f"{where}.blocklist: must be true or false")
        cats[code] = Category(
            code=code, name=name, description=str(c.get("description", "")), **actions,
            patterns=_regexes(_strs(c.get("patterns", []), f"{where}.patterns"), f"{where}.patterns"),
            pii=pii, blocklist=blocklist,
            words=tuple(w.lower() for w in _strs(c.get("words", []), f"{where}.words")),
            allow_words=frozenset(w.lower() for w in _strs(c.get("allow_words", []), f"{where}.allow_words")),
            foreign_identifiers=_regexes(_strs(c.get("foreign_identifiers", []), f"{where}.foreign_identifiers"),
                                         f"{where}.foreign_identifiers"),
            allowed_identifiers=frozenset(s.lower() for s in _strs(c.get("allowed_identifiers", []),
                                                                    f"{where}.allowed_identifiers")),
        )
    refusal = obj.get("refusal", "I'm sorry, but I can't help with that.")
    if not isinstance(refusal, str) or not refusal.strip():
        raise ConfigError(f"{source}: refusal: must be a non-empty string")
    window = obj.get("stream_window", 48)
    if not isinstance(window, int) or window < 0:
        raise ConfigError(f"{source}: stream_window: must be an integer >= 0, got {window!r}")
    threshold = obj.get("threshold", 0.5)
    if not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
        raise ConfigError(f"{source}: threshold: must be a number between 0 and 1, got {threshold!r}")
    classifier = obj.get("classifier", "")
    if not isinstance(classifier, str):
        raise ConfigError(f"{source}: classifier: must be a path string")
    return Policy(name=str(obj.get("name", Path(source).stem)), categories=cats, refusal=refusal.strip(),
                  stream_window=window, classifier=classifier, threshold=float(threshold),
                  version=int(obj.get("version", 1)), source=source)


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy in ``path``; ``None`` or ``"default"`` is the shipped default policy."""
    p = default_policy_path() if path in (None, "", DEFAULT_POLICY) else Path(path)  # type: ignore[arg-type]
    if not p.is_file():
        raise ConfigError(f"{p}: no such policy file (give a TOML file, or 'default' for the shipped policy)")
    try:
        obj = tomllib.loads(p.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: malformed TOML: {e}") from e
    return parse_policy(obj, str(p))
