"""Balance: how fine-tuning rows spread over chosen attributes, and a balanced subset or weights.

``chatforge data balance FILE --by ATTR [--by ATTR ...] [--mode report|downsample|reweight]``.

Rows are classification rows ``{"text", "label", ...}`` or chat rows ``{"messages": [{role,
content}, ...], ...}`` (TRL's ``prompt``/``completion`` too), from ``.jsonl``, ``.parquet`` or
``hf:NAME``. An attribute is

* any top-level field of the rows (``label``, ``intent``, ``source``, ``split`` ...): its
  value must be a string, number, boolean or null; a row without it is an error naming
  its ``file:line`` and the field;
* ``gendered_terms``: female vs male terms (pronouns and gendered nouns, ``FEMALE_TERMS``
  / ``MALE_TERMS``) in the row's text (a chat row's text is its messages' content),
  bucketed ``female`` / ``male`` / ``both`` / ``none``; the report adds the term counts;
* ``names``: which known first names the text mentions (whole words, case-sensitive,
  so "grace period" is not Grace). The names are SupportWorld's customers' first names
  unless ``names=`` gives a list or a name -> group mapping; with groups the value is the
  group (``female``, ``region:asia`` ... whatever the mapping says), else the name.
  A row naming several gets them joined with ``+``, a row naming none ``none``; the
  report adds the most mentioned names with the share of rows mentioning each.

The report gives, per attribute (and for the joint value of several), each value's count
and share, the imbalance ratio (largest share / smallest share; 1 = balanced) and the
normalised entropy (entropy of the shares / log of the number of values; 1 = balanced).

``downsample`` keeps, for each (joint) value, a seeded random ``min count`` of its rows,
in their original order; ``reweight`` keeps every row and sets ``"weight"`` to
``N / (K * count(value))`` (N rows, K values), so every value's rows weigh ``N / K`` in
all and the weights average 1 (the loss keeps its scale). Both write ``out`` atomically
and ``<out>.balance.json`` with the report before and after; the after-report is computed
from the written file, so it states what is actually there. The classification stage
weights each training example's loss by a ``weight`` field (``finetune.classify``); chat
SFT packs conversations into blocks and ignores it, so for chat rows the weights are for
a sampler (or use ``downsample``).

All rows are held in memory: this is for fine-tuning sets, not pre-training corpora.
"""

from __future__ import annotations

import functools
import json
import math
import random
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chatforge.data.records import iter_records
from chatforge.errors import ChatforgeError, DataError
from chatforge.io import atomic_write, dumps_line, write_json

MODES = ("report", "downsample", "reweight")
WEIGHT_FIELD = "weight"
GENDERED = "gendered_terms"
NAMES = "names"
DERIVED = (GENDERED, NAMES)
JOINT_SEP = " | "  # between the parts of a joint value
TOP_NAMES = 20  # names listed in a ``names`` report

# Pronouns and gendered nouns, lower case. Left out on purpose: words that are mostly something
# else in support text ("miss" the delivery, "ms" the unit, "guy"/"guys" as a greeting to anyone).
FEMALE_TERMS = frozenset({
    "she", "her", "hers", "herself", "woman", "women", "girl", "girls", "lady", "ladies", "female", "females",
    "mother", "mothers", "mom", "moms", "mum", "mums", "daughter", "daughters", "wife", "wives", "sister",
    "sisters", "aunt", "aunts", "niece", "nieces", "grandmother", "grandmothers", "grandma", "granddaughter",
    "granddaughters", "girlfriend", "girlfriends", "bride", "madam", "ma'am", "mrs", "queen", "princess",
    "actress", "waitress", "stepmother", "stepdaughter", "businesswoman", "businesswomen", "chairwoman",
    "spokeswoman", "saleswoman"
})
MALE_TERMS = frozenset({
    "he", "him", "his", "himself", "man", "men", "boy", "boys", "gentleman", "gentlemen", "male", "males",
    "father", "fathers", "dad", "dads", "son", "sons", "husband", "husbands", "brother", "brothers", "uncle",
    "uncles", "nephew", "nephews", "grandfather", "grandfathers", "grandpa", "grandson", "grandsons",
    "boyfriend", "boyfriends", "groom", "sir", "mr", "king", "prince", "actor", "waiter", "stepfather",
    "stepson", "businessman", "businessmen", "chairman", "spokesman", "salesman"
})
_WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")  # "ma'am" and "man-made" are one word (the latter not a man)


# --------------------------------------------------------------------------- reading rows


def row_text(row: dict[str, Any], where: str) -> str:
    """The text of a row: ``text``, or its messages' content (``messages``, or ``prompt`` + ``completion``)."""
    parts: list[str] = []
    if "messages" in row:
        parts += _contents(row["messages"], where, "messages")
    elif isinstance(row.get("text"), str):
        parts.append(row["text"])
    elif "prompt" in row or "completion" in row:
        for key in ("prompt", "completion"):
            value = row.get(key)
            if isinstance(value, str):
                parts.append(value)
            elif value is not None:
                parts += _contents(value, where, key)
    else:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: no field 'text' or 'messages' to read the derived attributes "
                        f"({', '.join(DERIVED)}) from (fields present: {present})")
    return "\n".join(parts)


def _contents(messages: Any, where: str, key: str) -> list[str]:
    if not isinstance(messages, list):
        raise DataError(f"{where}: field {key!r} must be a list of {{\"role\", \"content\"}} objects, "
                        f"got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, str):
            raise DataError(f"{where}: field {key!r}[{i}]: needs a string 'content'")
        out.append(content)
    return out


def field_value(row: dict[str, Any], attr: str, where: str) -> str:
    """A top-level field's value as a string key (non-strings as JSON: ``true``, ``3``, ``null``)."""
    if attr not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(f"{where}: missing field {attr!r} (fields present: {present})")
    value = row[attr]
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, bool | int | float):
        return json.dumps(value)
    raise DataError(f"{where}: field {attr!r} must be a string, number, boolean or null to group rows by, "
                    f"got {type(value).__name__}")


# --------------------------------------------------------------------------- derived attributes


def gendered_counts(text: str) -> tuple[int, int]:
    """``(female, male)`` term counts in ``text``."""
    words = [w.removesuffix("'s") for w in _WORD.findall(text.lower().replace("\u2019", "'"))]  # "wife's" is "wife"
    return sum(w in FEMALE_TERMS for w in words), sum(w in MALE_TERMS for w in words)


def gender_bucket(female: int, male: int) -> str:
    if female and male:
        return "both"
    return "female" if female else "male" if male else "none"


@dataclass(frozen=True)
class NameGroups:
    """Known first names and, optionally, the group of each."""

    groups: dict[str, str | None]  # name -> group (None: no group information)
    source: str

    @property
    def grouped(self) -> bool:
        return any(g is not None for g in self.groups.values())

    @functools.cached_property
    def regex(self) -> re.Pattern[str] | None:
        if not self.groups:
            return None
        alts = sorted((re.escape(n) for n in self.groups), key=len, reverse=True)
        return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)")

    def found(self, text: str) -> list[str]:
        """The distinct names in ``text``, sorted."""
        return sorted({m.group(0) for m in self.regex.finditer(text)}) if self.regex is not None else []


def supportworld_names() -> NameGroups:
    """SupportWorld's customers' first names (no group information is defined for them)."""
    from chatforge.data.supportworld.world import FIRST_NAMES

    return NameGroups(dict.fromkeys(FIRST_NAMES), "chatforge.data.supportworld.world.FIRST_NAMES")


def load_name_groups(path: str | Path) -> NameGroups:
    """Names from a file: a JSON object ``{name: group}`` or list of names, or text lines ``name``
    / ``name<TAB>group`` / ``name,group`` (``#`` starts a comment)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the names file: {e}") from e
    groups: dict[str, str | None] = {}
    if path.suffix.lower() == ".json":
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: malformed JSON: {e.msg} (line {e.lineno})") from e
        items = obj.items() if isinstance(obj, dict) else ((n, None) for n in obj) if isinstance(obj, list) else None
        if items is None:
            raise DataError(f"{path}: expected a JSON object {{name: group}} or a list of names")
        for name, group in items:
            if not isinstance(name, str) or not name.strip() or not (group is None or isinstance(group, str)):
                raise DataError(f"{path}: entry {name!r}: names and groups must be non-empty strings")
            groups[name.strip()] = group
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            name, _, group = line.partition("\t") if "\t" in line else line.partition(",")
            if not name.strip():
                raise DataError(f"{path}:{lineno}: empty name")
            groups[name.strip()] = group.strip() or None
    if not groups:
        raise DataError(f"{path}: no names")
    return NameGroups(groups, str(path))


# --------------------------------------------------------------------------- the rows' values


@dataclass
class Table:
    """Rows with their value of each attribute, and the derived attributes' details."""

    source: str
    by: list[str]
    rows: list[dict[str, Any]]
    values: list[tuple[str, ...]]  # per row, one value per attribute of ``by``
    details: dict[str, dict[str, Any]] = field(default_factory=dict)


def tabulate(rows: Iterable[tuple[str, dict[str, Any]]], by: list[str], source: str,
             names: NameGroups | None = None) -> Table:
    """Each row's value of each attribute of ``by``; errors name the row's location and the field."""
    if not by:
        raise ChatforgeError("balance: give at least one attribute (--by ATTR)")
    if len(set(by)) != len(by):
        raise ChatforgeError(f"balance: an attribute is given twice: {', '.join(by)}")
    names = names if names is not None or NAMES not in by else supportworld_names()
    kept: list[dict[str, Any]] = []
    values: list[tuple[str, ...]] = []
    terms = Counter()
    mentions: Counter[str] = Counter()
    for where, row in rows:
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        text = row_text(row, where) if any(a in DERIVED for a in by) else ""
        value = []
        for attr in by:
            if attr == GENDERED:
                female, male = gendered_counts(text)
                terms["female"] += female
                terms["male"] += male
                value.append(gender_bucket(female, male))
            elif attr == NAMES:
                assert names is not None
                found = names.found(text)
                mentions.update(found)
                labels = sorted({names.groups[n] or n for n in found}) if names.grouped else found
                value.append("+".join(labels) or "none")
            else:
                value.append(field_value(row, attr, where))
        kept.append(row)
        values.append(tuple(value))
    if not kept:
        raise DataError(f"{source}: no rows")
    table = Table(source, list(by), kept, values)
    if GENDERED in by:
        table.details[GENDERED] = {"terms": {"female": terms["female"], "male": terms["male"]}}
    if NAMES in by:
        assert names is not None
        n = len(kept)
        table.details[NAMES] = {
            "names_from": names.source, "grouped": names.grouped,
            "top_names": [{"name": k, "rows": c, "share": round(c / n, 4)}
                          for k, c in sorted(mentions.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_NAMES]],
        }
    return table


def read_table(source: str | Path, by: list[str], names: NameGroups | None = None, split: str = "train") -> Table:
    """``tabulate`` the rows of a ``.jsonl``/``.parquet`` file or ``hf:NAME``."""
    return tabulate(iter_records(source, split), by, str(source), names)


# --------------------------------------------------------------------------- the report


def distribution(counts: dict[str, float], rows: dict[str, int] | None = None) -> dict[str, Any]:
    """Shares, imbalance ratio and normalised entropy of ``counts`` (rows, or total weights per value)."""
    total = sum(counts.values())
    shares = {k: (v / total if total else 0.0) for k, v in counts.items()}
    present = [s for s in shares.values() if s > 0]
    k = len(present)
    entropy = -sum(s * math.log(s) for s in present)
    out: dict[str, Any] = {
        "values": {key: {"count": rows[key] if rows is not None else int(counts[key]),
                         **({"weight": round(counts[key], 6)} if rows is not None else {}),
                         "share": round(shares[key], 4)}
                   for key in sorted(counts, key=lambda x: (-counts[x], x))},
        "distinct": k,
        # max/min share: how many times more the largest group weighs than the smallest (1 = balanced)
        "imbalance_ratio": round(max(present) / min(present), 4) if present else None,
        # entropy / log K: 1 when every value has the same share, towards 0 as one value dominates
        "normalized_entropy": round(entropy / math.log(k), 4) if k > 1 else 1.0,
    }
    return out


def report(table: Table, weights: list[float] | None = None) -> dict[str, Any]:
    """The balance of ``table`` per attribute (and jointly, for several); ``weights``: weighted shares."""
    def dist(keys: list[str]) -> dict[str, Any]:
        rows = Counter(keys)
        if weights is None:
            return distribution(dict(rows))
        totals: dict[str, float] = {}
        for key, w in zip(keys, weights):
            totals[key] = totals.get(key, 0.0) + w
        return distribution(totals, dict(rows))

    out: dict[str, Any] = {"file": table.source, "rows": len(table.rows), "by": table.by,
                           "weighted": weights is not None, "attributes": {}}
    for i, attr in enumerate(table.by):
        out["attributes"][attr] = {**dist([v[i] for v in table.values]), **table.details.get(attr, {})}
    if len(table.by) > 1:
        out["joint"] = dist([joint_key(v) for v in table.values])
    return out


def joint_key(value: tuple[str, ...]) -> str:
    return JOINT_SEP.join(value)


# --------------------------------------------------------------------------- downsample / reweight


def downsample(table: Table, seed: int) -> list[int]:
    """Indices of the rows kept: a seeded random ``min count`` of each joint value's rows, in file order."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for i, v in enumerate(table.values):
        groups.setdefault(v, []).append(i)
    target = min(len(ix) for ix in groups.values())
    rng = random.Random(seed)
    keep: list[int] = []
    for v in sorted(groups):  # a fixed order, so the same seed keeps the same rows
        keep += rng.sample(groups[v], target)
    return sorted(keep)


def reweight(table: Table) -> list[float]:
    """``N / (K * count(value))`` per row: every joint value's rows weigh ``N / K`` together."""
    counts = Counter(table.values)
    n, k = len(table.values), len(counts)
    return [n / (k * counts[v]) for v in table.values]


def balance_file(source: str | Path, by: list[str], mode: str = "report", out: str | Path | None = None,
                 seed: int = 0, names: NameGroups | None = None) -> dict[str, Any]:
    """Report on ``source``'s balance over ``by``; with ``downsample``/``reweight`` also write ``out`` and
    ``<out>.balance.json``. Returns ``{"mode", "before", "after"?, "out"?, "report_file"?}``."""
    if mode not in MODES:
        raise ChatforgeError(f"balance: mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "report":
        if out is not None:
            raise ChatforgeError("balance: --out is for --mode downsample or reweight (use --json for the report)")
        return {"mode": mode, "before": report(read_table(source, by, names))}
    if out is None:
        raise ChatforgeError(f"balance: --mode {mode} needs --out FILE (a .jsonl file to write)")
    out = Path(out)
    if out.suffix.lower() != ".jsonl":
        raise ChatforgeError(f"balance: --out {out}: the output is JSON lines; give a .jsonl path")
    if not str(source).startswith("hf:") and Path(source).resolve() == out.resolve():
        raise ChatforgeError(f"balance: --out {out} is the input file; write the balanced rows elsewhere")
    table = read_table(source, by, names)
    before = report(table)
    if mode == "downsample":
        rows = [table.rows[i] for i in downsample(table, seed)]
    else:
        rows = [{**row, WEIGHT_FIELD: w} for row, w in zip(table.rows, reweight(table))]
    with atomic_write(out) as f:
        for row in rows:
            f.write(dumps_line(row))
            f.write("\n")
    # Read back what was written: the after-report describes the file, not our intentions.
    written = read_table(out, by, names)
    after = report(written, read_weights(out) if mode == "reweight" else None)
    result = {"mode": mode, "seed": seed, "out": str(out), "report_file": str(report_path(out)),
              "before": before, "after": after}
    write_json(report_path(out), result)
    return result


def report_path(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".balance.json")


def read_weights(source: str | Path, split: str = "train") -> list[float]:
    """Every row's ``weight`` (1.0 where a row has none); a non-number or negative weight is an error."""
    return [example_weight(row, where) for where, row in iter_records(source, split)]


def example_weight(row: dict[str, Any], where: str, name: str = WEIGHT_FIELD) -> float:
    """A row's weight field ``name``, checked: a finite number >= 0 (1.0 when the row has none)."""
    w = row.get(name, 1.0)
    if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
        raise DataError(f"{where}: field {name!r} must be a finite number >= 0 (a loss weight), got {w!r}")
    return float(w)


# --------------------------------------------------------------------------- printing


def format_result(result: dict[str, Any]) -> str:
    """The before (and after) report as aligned text, one block per attribute."""
    before, after = result["before"], result.get("after")
    lines = [f"{before['file']}: {before['rows']} rows" + (f" -> {after['file']}: {after['rows']} rows"
                                                           + (" (weighted)" if after["weighted"] else "")
                                                           if after else "")]
    blocks = [(attr, before["attributes"][attr], after["attributes"][attr] if after else None)
              for attr in before["by"]]
    if "joint" in before:
        blocks.append(("joint (" + JOINT_SEP.join(before["by"]) + ")", before["joint"],
                       after["joint"] if after else None))
    for name, b, a in blocks:
        lines.append("")
        lines.append(f"{name}: {b['distinct']} values, imbalance {_fmt(b['imbalance_ratio'])}, "
                     f"normalised entropy {_fmt(b['normalized_entropy'])}"
                     + (f"  ->  imbalance {_fmt(a['imbalance_ratio'])}, normalised entropy "
                        f"{_fmt(a['normalized_entropy'])}" if a else ""))
        width = max([len(k) for k in b["values"]] + [5])
        head = f"  {'value':<{width}}  {'count':>7}  {'share':>6}"
        lines.append(head + (f"  {'after':>9}  {'share':>6}" if a else ""))
        for key, v in b["values"].items():
            line = f"  {key:<{width}}  {v['count']:>7}  {v['share']:>6.1%}"
            if a:
                av = a["values"].get(key, {"count": 0, "share": 0.0})
                shown = f"{av['weight']:.1f}w" if "weight" in av else str(av["count"])
                line += f"  {shown:>9}  {av['share']:>6.1%}"
            lines.append(line)
        extra = (b.get("terms"), b.get("top_names"))
        if extra[0]:
            lines.append(f"  terms: {extra[0]['female']} female, {extra[0]['male']} male")
        if extra[1]:
            lines.append("  top names: " + ", ".join(f"{t['name']} {t['share']:.1%}" for t in extra[1][:10])
                         + ("" if b.get("grouped") else " (no name groups: give --names FILE with name,group)"))
    if after:
        lines += ["", f"wrote {result['out']} and {result['report_file']}"]
    return "\n".join(lines)


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3g}"
